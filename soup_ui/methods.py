"""Merge methods: one registry of pure torch functions, each with its typed parameters (mergekit's
`@merge_method` shape). Torch and pydantic only: no files, no UI.

A method is registered once with `@merge_method`; the page's method choice and parameter controls,
the CLI's `--method/--param`, the API fields, recipe validation, cache keys and export metadata are
all read from `METHODS`. Linear methods (a fixed coefficient per shard and for the base) also give
their `coefficients`, so the engine merges them in one fused pass over flat buffers; the others run
tensor by tensor through their function, which writes the merged tensor into `out` in place:

    fn(out, sources, weights, base, params, generator) -> None

`sources` are the shards' tensors, `weights` their normalized weights (sum 1), `base` the base
model's tensor (None unless the method needs it), `generator` a CPU generator seeded from the recipe
and the tensor's name (random methods only), so the same recipe gives the same weights on any tier.
Everything is computed in float32 (float64 for float64 targets) and rounded once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Tensors = Mapping[str, torch.Tensor]


class Params(BaseModel):
    """A method's parameters: validated once where a request enters, frozen afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def values(self) -> dict:
        """By their public names (`lambda`, not `lambda_`), for recipes, labels and cache keys."""
        return self.model_dump(by_alias=True)


class NoParams(Params):
    pass


def LAMBDA():
    return Field(1.0, ge=0.0, le=10.0, alias="lambda", allow_inf_nan=False, description="scales the merged task vector: base + lambda x merged")


def DENSITY(default: float = 0.5):
    return Field(default, ge=0.0, le=1.0, allow_inf_nan=False, description="the fraction of each task vector's entries kept")


def SEED():
    return Field(0, ge=0, le=2**32 - 1, description="seeds the random drop: the same recipe gives the same weights")


class TaskArithmeticParams(Params):
    lambda_: float = LAMBDA()


class AddDifferenceParams(Params):
    alpha: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False, description="how much of (B - C) is added to A")
    c: str = Field("base", min_length=1, max_length=64, description="what is subtracted: 'base', or the name of a ticked shard")


class TiesParams(Params):
    density: float = DENSITY(0.2)
    lambda_: float = LAMBDA()


class DareParams(Params):
    density: float = DENSITY()
    lambda_: float = LAMBDA()
    seed: int = SEED()


class DellaParams(Params):
    density: float = DENSITY()
    epsilon: float = Field(0.1, ge=0.0, le=0.5, allow_inf_nan=False,
                           description="keep probabilities run from density - epsilon (smallest entries) to density + epsilon (largest)")
    lambda_: float = LAMBDA()
    seed: int = SEED()

    @model_validator(mode="after")
    def _probabilities_in_range(self):
        if self.density - self.epsilon <= 0 or self.density + self.epsilon > 1:
            raise ValueError(
                f"density - epsilon must be > 0 and density + epsilon <= 1 (keep probabilities), got density {self.density:g}, epsilon {self.epsilon:g}"
            )
        return self


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its name, formula, reference, parameters and how it runs."""

    name: str
    summary: str  # the formula, one line
    reference: str  # paper or tool it follows
    params: type[Params]
    fn: Callable | None  # the per-tensor function (None for linear methods: their coefficients say it all)
    needs_base: bool
    coefficients: Callable | None = None  # linear methods: (weights, params) -> (per-shard coefficients, base coefficient)
    random: bool = False
    min_shards: int = 1
    max_shards: int | None = None

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    def parse(self, values: Mapping | Params | None = None) -> Params:
        """Typed parameters from a mapping (page, CLI, API, recipe); ValueError naming the method,
        the parameter and the value."""
        if isinstance(values, self.params):
            return values
        given = dict(values or {})
        try:
            return self.params.model_validate(given)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    known = ", ".join(self.param_names()) or "none"
                    problems.append(f"{self.name} has no parameter {key!r} (its parameters: {known})")
                elif key:
                    problems.append(f"{self.name}: {key} = {given.get(key)!r}: {msg}")
                else:
                    problems.append(f"{self.name}: {msg}")
            raise ValueError("; ".join(problems)) from None

    def param_names(self) -> list[str]:
        return [f.alias or n for n, f in self.params.model_fields.items()]

    def check_shards(self, count: int) -> None:
        if count < self.min_shards or (self.max_shards is not None and count > self.max_shards):
            wanted = f"exactly {self.min_shards}" if self.min_shards == self.max_shards else (
                f"{self.min_shards} to {self.max_shards}" if self.max_shards else f"at least {self.min_shards}")
            raise ValueError(f"{self.name} merges {wanted} shards; {count} selected")


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, summary: str, reference: str, params: type[Params] = NoParams, needs_base: bool = True,
                 coefficients: Callable | None = None, random: bool = False, min_shards: int = 1, max_shards: int | None = None):
    """Register a merge method under `name` (the decorated function is its per-tensor function)."""

    def register(fn: Callable | None) -> Callable | None:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name, summary, reference, params, fn, needs_base, coefficients, random, min_shards, max_shards)
        return fn

    return register


def method(name: str) -> MergeMethod:
    """The registered method `name`; ValueError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(METHODS)})") from None


# -- shared steps -------------------------------------------------------------------------------------
def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """True for the k = int(density * n) entries of largest magnitude (TIES' trim step; the same
    selection as peft's `magnitude_based_pruning`, found with a sampled threshold and one exact
    selection over the entries near it instead of a full top-k, which is ~10x slower on large tensors)."""
    flat = delta.abs().reshape(-1)
    n = flat.numel()
    k = int(density * n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if n > 1 << 16:  # bracket the threshold from a sample, then select exactly among the entries in the bracket
        g = torch.Generator("cpu").manual_seed(n)
        sample = flat[torch.randint(n, (1 << 14,), generator=g).to(flat.device)].float()
        q = 1.0 - k / n
        lo, hi = torch.quantile(sample, torch.tensor([max(0.0, q - 0.02), min(1.0, q + 0.02)], device=sample.device))
        above = int((flat > hi).sum())
        band = flat[(flat >= lo) & (flat <= hi)]
        need = k - above
        if 0 < need <= band.numel():
            threshold = torch.kthvalue(band.float(), band.numel() - need + 1).values
            return (delta.abs() >= threshold.to(delta.dtype)).reshape(delta.shape)
    threshold = torch.kthvalue(flat.float(), n - k + 1).values
    return (delta.abs() >= threshold.to(delta.dtype)).reshape(delta.shape)


def random_keep(delta: torch.Tensor, probability: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with `probability` (drawn on the CPU, so every device draws the
    same mask), rescale the kept ones by 1 / probability; probability 0 drops everything."""
    p = torch.as_tensor(probability, dtype=delta.dtype)
    if p.numel() == 1 and float(p) >= 1:
        return delta
    if p.numel() == 1 and float(p) <= 0:
        return torch.zeros_like(delta)
    draw = torch.rand(delta.shape, generator=generator, dtype=torch.float32).to(delta.device)
    p = p.to(delta.device)
    return torch.where(draw < p, delta / p, torch.zeros_like(delta))


def sign_consensus(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' elect and disjoint merge: s = sign(sum_i w_i t_i) (peft's majority-sign mask, 'total');
    sum_i w_i t_i [sign(t_i) = s, t_i != 0] / sum_i w_i [same], 0 where no entry agrees."""
    from peft.utils.merge_utils import calculate_majority_sign_mask

    weighted = torch.stack([w * t for w, t in zip(weights, deltas)])
    agree = calculate_majority_sign_mask(weighted, method="total")  # sign(w t) == s; a zero entry never agrees
    w = torch.tensor(list(weights), dtype=weighted.dtype, device=weighted.device).view(-1, *([1] * deltas[0].dim()))
    numerator = (weighted * agree).sum(0)
    denominator = (w * agree).sum(0)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(weighted.dtype).tiny), torch.zeros_like(numerator))


def _write(out: torch.Tensor, value: torch.Tensor) -> None:
    out.copy_(value.to(out.dtype).view(out.shape))


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor seed of a random method: the recipe's seed and the tensor's name, so a tensor's
    draw does not depend on the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# -- the methods --------------------------------------------------------------------------------------
merge_method(
    "average", summary="sum_i w_i theta_i (weights normalized): the paper's soup",
    reference="Diffusion Soup, Biggs et al. 2024 (arXiv 2406.08431), Eq. 2", needs_base=False,
    coefficients=lambda w, p: (list(w), 0.0),
)(None)

merge_method(
    "task-arithmetic", summary="base + lambda sum_i w_i (theta_i - base)",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)", params=TaskArithmeticParams,
    coefficients=lambda w, p: ([p.lambda_ * x for x in w], 1.0 - p.lambda_),
)(None)


def _add_difference_coefficients(weights, p: AddDifferenceParams):
    # Sources are ordered A, B (and C when it is a shard; the Mix puts it last): A + alpha (B - C).
    if p.c == "base":
        return [1.0, p.alpha], -p.alpha
    return [1.0, p.alpha, -p.alpha], 0.0


merge_method(
    "add-difference", summary="A + alpha (B - C), C the base or a chosen shard; the weights are not used",
    reference="AUTOMATIC1111's checkpoint merger ('Add difference')", params=AddDifferenceParams,
    coefficients=_add_difference_coefficients, min_shards=2, max_shards=3,
)(None)


@merge_method(
    "ties", summary="base + lambda x TIES(trim to density, elect sign, disjoint mean of t_i = theta_i - base)",
    reference="Yadav et al. 2023, TIES-Merging (arXiv 2306.01708), as mergekit formulates it", params=TiesParams,
)
def ties(out, sources, weights, base, p: TiesParams, generator=None):
    """Trim each task vector to its `density` largest entries, elect the sign of the weighted sum,
    and average (weighted) the entries that agree with it."""
    b = _acc(base)
    deltas = [_acc(s) - b for s in sources]
    deltas = [t * magnitude_mask(t, p.density) for t in deltas]
    _write(out, b + p.lambda_ * sign_consensus(deltas, weights))


@merge_method(
    "dare", summary="base + lambda sum_i w_i DARE(t_i): keep each entry with probability density, rescale by 1/density",
    reference="Yu et al. 2024, Language models are Super Mario (DARE, arXiv 2311.03099)", params=DareParams, random=True,
)
def dare(out, sources, weights, base, p: DareParams, generator):
    """Drop and rescale each task vector, then task arithmetic (density 1 is task arithmetic)."""
    b = _acc(base)
    total = torch.zeros_like(b)
    for s, w in zip(sources, weights):
        total += w * random_keep(_acc(s) - b, p.density, generator)
    _write(out, b + p.lambda_ * total)


@merge_method(
    "dare-ties", summary="base + lambda x TIES' sign election over DARE(t_i)",
    reference="Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES), as mergekit's dare_ties", params=DareParams, random=True,
)
def dare_ties(out, sources, weights, base, p: DareParams, generator):
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    b = _acc(base)
    deltas = [random_keep(_acc(s) - b, p.density, generator) for s in sources]
    _write(out, b + p.lambda_ * sign_consensus(deltas, weights))


def rank_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities: within each row (the tensor viewed as (shape[0], -1); a vector is
    one row), entries ranked by magnitude get density - epsilon (smallest) to density + epsilon
    (largest), linearly in rank (mergekit's rank_magnitude)."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full_like(delta, density)
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(n, dtype=rows.dtype, device=rows.device).expand_as(rows).contiguous())
    return (density - epsilon + (2 * epsilon / (n - 1)) * ranks).reshape(delta.shape)


@merge_method(
    "della", summary="base + lambda x TIES' sign election over t_i kept with probability ranked by magnitude (density +- epsilon), rescaled",
    reference="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617), as mergekit's della", params=DellaParams, random=True,
)
def della(out, sources, weights, base, p: DellaParams, generator):
    """MagPrune: larger entries are more likely kept; each kept entry is rescaled by 1 / its keep
    probability; then sign election and the disjoint mean."""
    b = _acc(base)
    deltas = []
    for s in sources:
        t = _acc(s) - b
        deltas.append(random_keep(t, rank_probabilities(t, p.density, p.epsilon), generator))
    _write(out, b + p.lambda_ * sign_consensus(deltas, weights))


DOT_THRESHOLD = 0.9995  # mergekit's: above it the two tensors count as parallel and are interpolated linearly


@merge_method(
    "slerp", summary="spherical interpolation of two shards per tensor, t = the second shard's weight (linear when near-parallel)",
    reference="Shoemake 1985; mergekit's slerp", needs_base=False, min_shards=2, max_shards=2,
)
def slerp(out, sources, weights, base, p: NoParams, generator=None):
    """sin((1-t) omega)/sin omega v0 + sin(t omega)/sin omega v1, omega the angle between the two
    tensors (flattened); lerp when |cos omega| > 0.9995."""
    v0, v1 = _acc(sources[0]), _acc(sources[1])
    t = weights[1]
    n0, n1 = v0.norm(), v1.norm()
    dot = float((v0 / n0.clamp(min=1e-12) * (v1 / n1.clamp(min=1e-12))).sum()) if n0 > 0 and n1 > 0 else 1.0
    if abs(dot) > DOT_THRESHOLD:
        _write(out, (1 - t) * v0 + t * v1)
        return
    omega = math.acos(dot)
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    _write(out, s0 * v0 + s1 * v1)


@merge_method(
    "model-stock", summary="t w_avg + (1 - t) base, t = K cos / (1 + (K - 1) cos), cos the mean pairwise cosine of the t_i",
    reference="Jang et al. 2024, Model Stock (arXiv 2403.19522)", min_shards=2,
)
def model_stock(out, sources, weights, base, p: NoParams, generator=None):
    """Per tensor, how far to go from the base towards the (weighted) average follows from the angle
    between the task vectors; a negative mean cosine counts as 0 (t = 0: the base)."""
    b = _acc(base)
    deltas = [(_acc(s) - b).reshape(-1) for s in sources]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            ni, nj = deltas[i].norm(), deltas[j].norm()
            cosines.append(float((deltas[i] @ deltas[j]) / (ni * nj)) if ni > 0 and nj > 0 else 0.0)
    cos = max(0.0, sum(cosines) / len(cosines))
    k = len(deltas)
    t = k * cos / (1 + (k - 1) * cos)
    average = sum(w * _acc(s) for w, s in zip(weights, sources))
    _write(out, t * average + (1 - t) * b)


# -- the engine -----------------------------------------------------------------------------------------
@torch.no_grad()
def merge_into(
    target: Tensors, method_: MergeMethod, params: Params, sources: Sequence[Tensors], weights: Sequence[float],
    base: Tensors | None = None, fused: bool | None = None, progress: Callable[[float], None] | None = None,
) -> None:
    """Merge `sources` (normalized `weights`) into `target` in place with a registered method.

    Linear methods are one weighted sum (`soup.weighted_sum_into`: one pass over flat buffers); the
    others run tensor by tensor (lazily read sources, lean or pinned, are resident one tensor each).
    Everything is checked before the first write."""
    from . import soup

    if method_.needs_base and base is None:
        raise ValueError(f"{method_.name} needs the base weights")
    if method_.linear:
        coefficients, base_coefficient = method_.coefficients(list(weights), params)
        extra = [base] if base_coefficient else []
        soup.weighted_sum_into(target, [*sources, *extra], [*coefficients, *([base_coefficient] if extra else [])], fused)
        return
    soup.check_compatible(target, [*sources, *([base] if base is not None else [])])
    read_order = getattr(sources[0], "read_order", None)  # lazy sources: walk their files front to back
    names = list(target)
    if callable(read_order):
        rank = {n: i for i, n in enumerate(read_order())}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    seed = getattr(params, "seed", 0)
    for i, name in enumerate(names):
        out = target[name]
        if not out.is_floating_point():  # integer buffers (counters): the first source's
            out.copy_(sources[0][name])
            continue
        generator = torch.Generator("cpu").manual_seed(tensor_seed(seed, name)) if method_.random else None
        method_.fn(out, [s[name] for s in sources], list(weights), base[name] if base is not None else None, params, generator)
        if progress is not None:
            progress((i + 1) / len(names))
