"""Merge methods: one registry of pure torch functions, each with its typed parameters (mergekit's
`@merge_method` shape). Torch and pydantic only: no files, no UI.

A method is registered once with `@merge_method`; the page's method choice and parameter controls,
the CLI's `--method/--param`, the API fields, recipe validation, cache keys and export metadata are
all read from `METHODS`. Linear methods (a fixed coefficient per shard and for the base) also give
their `coefficients`, so the engine merges them in one fused pass over flat buffers; the others run
tensor by tensor through their function, which writes the merged tensor into `out` in place:

    fn(out, sources, weights, base, params, draws) -> None

`sources` are the shards' tensors, `weights` their normalized weights (sum 1), `base` the base
model's tensor (None unless the method needs it), `draws` where the tensor's random draws come from
(`Draws`: the recipe's seed, the tensor's name and the recipe's `rng`; random methods only), so the
same recipe gives the same weights on any tier and device.
Everything is computed in float32 (float64 for float64 targets) and rounded once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Literal

import numpy
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

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


def RNG():
    return Field("counter", description="how the drop is drawn: 'counter' (a hash of the seed, the tensor's name and each entry's "
                                        "index, computed in the merge kernel) or 'torch' (torch's CPU generator: recipes saved before 2026-12-03)")


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
    rng: Literal["counter", "torch"] = RNG()


class DellaParams(Params):
    density: float = DENSITY()
    epsilon: float = Field(0.1, ge=0.0, le=0.5, allow_inf_nan=False,
                           description="keep probabilities run from density - epsilon (smallest entries) to density + epsilon (largest)")
    lambda_: float = LAMBDA()
    seed: int = SEED()
    rng: Literal["counter", "torch"] = RNG()
    ranks: Literal["sampled", "exact"] = Field("sampled", description="'sampled': each row's magnitude ranks read off 64 of its entries "
                                               "(fast; probabilities near the exact ranks'); 'exact': each row sorted (recipes saved before 2026-12-03)")

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
    arrange: Callable | None = None  # (shard names, params) -> the order the function takes them in; ValueError if they do not fit
    blocked: Callable | None = None  # (weights, block multipliers, params) -> (weights, params) of one block; None: `for_block`'s rule
    batch: Callable | None = None  # (outs, sources per shard, weights, bases, params[, draws]): many small tensors at once, as `fn` one by one
    stats: Callable | None = None  # (bases, one shard's tensors, params) -> a number per tensor that depends on that shard alone (TIES' thresholds)
    stats_key: Callable | None = None  # params -> what the stats depend on (TIES: the density), for caching them across mixes

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    def for_block(self, weights: Sequence[float], multipliers: Sequence[float], params: Params) -> tuple[tuple[float, ...] | None, Params]:
        """The weights and parameters of one block, given each shard's multiplier for it: by default
        w_i m_i normalized across the shards, or None (the block keeps the base's weights) when they
        are all 0. ValueError when the method cannot take these multipliers."""
        if self.blocked is not None:
            return self.blocked(weights, multipliers, params)
        scaled = [w * m for w, m in zip(weights, multipliers)]
        total = math.fsum(scaled)
        return (tuple(x / total for x in scaled) if total > 0 else None), params

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
                 coefficients: Callable | None = None, random: bool = False, min_shards: int = 1, max_shards: int | None = None,
                 arrange: Callable | None = None, blocked: Callable | None = None, batch: Callable | None = None):
    """Register a merge method under `name` (the decorated function is its per-tensor function;
    `batch`, if given, merges many small tensors in one pass exactly as the function would)."""

    def register(fn: Callable | None) -> Callable | None:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name, summary, reference, params, fn, needs_base, coefficients, random, min_shards, max_shards, arrange, blocked, batch)
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


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors as one vector in the accumulation precision (joined first, converted once: many
    small conversions cost more than the one large one)."""
    return _acc(torch.cat([t.reshape(-1) for t in tensors]))


def _weighted_sum(deltas: Sequence[torch.Tensor], weights):
    total = deltas[0] * weights[0]
    for i in range(1, len(deltas)):
        total = total + deltas[i] * weights[i]
    return total


def sign_consensus(deltas: Sequence[torch.Tensor], weights) -> torch.Tensor:
    """TIES' elect and disjoint merge: s = sign(sum_i w_i t_i), +1 where the sum is 0 (peft's and
    mergekit's rule); sum_i w_i t_i [sign(t_i) = s] / sum_i w_i [same], 0 where no entry agrees (a
    zero entry never agrees). Written without stacking, so a compiled kernel runs it in one pass."""
    total = _weighted_sum(deltas, weights)
    elected = torch.where(total >= 0, 1.0, -1.0)
    numerator = torch.zeros_like(total)
    denominator = torch.zeros_like(total)
    for i, d in enumerate(deltas):
        agree = d * elected > 0  # sign(d) = s (a 0 never agrees), in two vector operations instead of six
        numerator = numerator + torch.where(agree, d * weights[i], 0.0)
        denominator = denominator + torch.where(agree, weights[i], 0.0)
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), 0.0)


def _write(out: torch.Tensor, value: torch.Tensor) -> None:
    out.copy_(value.to(out.dtype).view(out.shape))


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor seed of a random method: the recipe's seed and the tensor's name, so a tensor's
    draw does not depend on the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _int32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


@dataclass(frozen=True)
class Draws:
    """Where one tensor's uniform draws come from (random methods): the recipe's seed and the tensor's
    name; the parameters' `rng` says which of the two below is used.

    'counter' (the default): entry j of shard i draws u = mix32(mix32(j + key) ^ shard_key(i)) / 2^32
    (its top 24 bits), key = the tensor seed's low 32 bits; int32 arithmetic, wrapping, computed inside
    the merge kernel: no draws in memory, the same bits on every device. mix32 is Chris Wellons'
    `lowbias32` integer hash. 'torch': a CPU generator seeded with `tensor_seed`, one `torch.rand` per
    shard (how recipes saved before 2026-12-03 drew; DARE on SD-1.5, K = 3: 13.3 s against 1.54 s)."""

    seed: int
    name: str

    @property
    def key(self) -> int:
        return _int32(tensor_seed(self.seed, self.name))

    def generator(self) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(tensor_seed(self.seed, self.name))


def shard_key(i: int) -> int:
    """Shard i's key, xored into each entry's hash: (i + 1) x the golden ratio's 32 bits."""
    return _int32((i + 1) * 0x9E3779B9)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on int32 tensors (wrapping multiplies; logical shifts by masking)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _int32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def counter_uniforms(counter: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` shards' uniforms in [0, 1) (float32, 24 bits) for int32 counters (entry index + key)."""
    h = mix32(counter)
    return [((mix32(h ^ shard_key(i)) >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24)) for i in range(count)]


# -- kernels: one pass per tensor, compiled for large tensors -------------------------------------------
def _ties_kernel(base, sources: list, thresholds, weights, lam):
    """base + lambda x TIES over the task vectors trimmed at each shard's magnitude threshold."""
    b = _acc(base)
    deltas = []
    for i, s in enumerate(sources):
        d = _acc(s) - b
        deltas.append(torch.where(d.abs() >= thresholds[i], d, 0.0))
    return b + lam * sign_consensus(deltas, weights)


def _dropped_kernel(base, sources: list, draws: list, probabilities: list, weights, lam, elect: bool):
    """DARE (elect=False: a weighted sum) or DARE-TIES / DELLA (elect=True: sign election) over task
    vectors kept where the uniform draw < the keep probability, rescaled by 1 / that probability."""
    b = _acc(base)
    deltas = []
    for i, s in enumerate(sources):
        p = probabilities[i]
        d = _acc(s) - b
        deltas.append(torch.where(draws[i] < p, d / torch.where(p > 0, p, 1.0), 0.0))
    return b + lam * (sign_consensus(deltas, weights) if elect else _weighted_sum(deltas, weights))


def _counted_kernel(base, sources: list, key, probabilities: list, weights, lam, elect: bool):
    """`_dropped_kernel` with counter draws made in the kernel: entry j's counter is j + key (key an
    int32 scalar, or per entry when small tensors are merged at once)."""
    counter = torch.arange(base.numel(), dtype=torch.int32, device=base.device) + key
    return _dropped_kernel(base, sources, counter_uniforms(counter, len(sources)), probabilities, weights, lam, elect)


def _ties_into(out, base, sources: list, thresholds, weights, lam):
    """out <- `_ties_kernel`: compiled, the write is part of the kernel (no full-size fp32 result to
    allocate and copy: that took two thirds of the time of a large tensor)."""
    out.copy_(_ties_kernel(base, sources, thresholds, weights, lam).view(out.shape))


def _dropped_into(out, base, sources: list, draws: list, probabilities: list, weights, lam, elect: bool):
    """out <- `_dropped_kernel`, written by the kernel (as `_ties_into`)."""
    out.copy_(_dropped_kernel(base, sources, draws, probabilities, weights, lam, elect).view(out.shape))


def _counted_into(out, base, sources: list, key, probabilities: list, weights, lam, elect: bool):
    """out <- `_counted_kernel`, written by the kernel (as `_ties_into`)."""
    out.copy_(_counted_kernel(base, sources, key, probabilities, weights, lam, elect).view(out.shape))


def _probe_kernel(base, sources: list, candidates: list):
    """Per shard i and each of its candidate magnitudes c (candidates: one vector per try, an entry
    per shard): how many |t_i| are >= c and how many > c, the smallest one above c (inf if none)
    and the largest one below c (-1 if none), as (shards, tries) each: one pass over the tensor for
    all of them, no temporaries (the exact selection's step). Counted in int32 (a quarter faster
    than bool sums in int64; tensors have fewer than 2^31 entries)."""
    b = _acc(base)
    at_least, above, smallest, below = [], [], [], []
    for i, s in enumerate(sources):
        a = (_acc(s) - b).abs()
        for c in candidates:
            over = a > c[i]
            at_least.append((a >= c[i]).to(torch.int32).sum(dtype=torch.int32))
            above.append(over.to(torch.int32).sum(dtype=torch.int32))
            smallest.append(torch.where(over, a, math.inf).min())
            below.append(torch.where(a < c[i], a, -1.0).max())
    shape = (len(sources), len(candidates))
    return tuple(torch.stack(x).view(shape) for x in (at_least, above, smallest, below))


FUSED_MIN_ELEMENTS = 1 << 18  # tensors from this size on run compiled (SD's larger tensors); smaller ones eager
# Inductor realizes an intermediate read twice (TIES' agree masks) as its own loop node; a node that
# loads no fp16 makes the whole fused loop run 8 float lanes wide, reading fp16 through partial
# (copied) vector loads: DARE-TIES on fp16 took 2-3x as long. Inlined, every node reads fp16 and the
# loop runs 16 wide; the operations and their order are the same (tested: the same weights).
COMPILE_OPTIONS = {"realize_opcount_threshold": 1 << 14, "realize_reads_threshold": 1 << 14, "realize_acc_reads_threshold": 1 << 14}
_compiled: dict[str, Callable] = {}
_failed: list[str] = []  # why compiling failed, once: then everything runs eager


def _run(kernel: Callable, *args):
    """kernel(*args), compiled for large tensors and batches of small ones (one variant per shard
    count and dtype, compiled on first use under soup.TRACING, like the soup kernel); eager for
    smaller ones (a small model's mix compiles nothing) or if compiling fails. Compiled and eager
    kernels do the same float32 operations in the same order (tested: the same weights)."""
    from . import soup

    if args[0].numel() < FUSED_MIN_ELEMENTS or _failed:
        return kernel(*args)
    name = kernel.__name__
    if name not in _compiled:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        _compiled[name] = torch.compile(kernel, dynamic=True, options=COMPILE_OPTIONS)
    try:
        with soup.TRACING:
            return _compiled[name](*args)
    except Exception as err:  # no C++ compiler, an unsupported device, ...
        if not soup.compile_failed(err):
            raise
        logger.warning("compiled merge kernels unavailable (%s: %s); running eager", type(err).__name__, err)
        _failed.append(f"{type(err).__name__}: {err}")
        return kernel(*args)


def _flat(x, n: int):
    """Tensors of n entries (and lists of them) as vectors: a compiled kernel is then compiled once
    for every shape (a conv's 4-d weight, a linear's 2-d one, a norm's vector), not once per rank."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1) if x.numel() == n and x.dim() != 1 else x
    if isinstance(x, list):
        return [_flat(v, n) for v in x]
    return x


def _into(kernel: Callable, out: torch.Tensor, base: torch.Tensor, *args, rows: tuple[int, int] | None = None) -> None:
    """kernel(out, base, *args), which writes its result into `out` (an `_into` kernel), every tensor
    of the base's size as a vector (or, given `rows`, out and base as rows x L, the arguments as the
    caller shaped them: DELLA); where `out` cannot be written so or lives on another device than the
    base, the result is computed beside the base and copied over."""
    n = base.numel()
    shape = rows or (n,)
    if rows is None:
        args = tuple(_flat(a, n) for a in args)
    if out.device == base.device and out.is_contiguous():
        _run(kernel, out.view(shape), base.reshape(shape), *args)
    else:
        result = torch.empty(shape, dtype=out.dtype, device=base.device)
        _run(kernel, result, base.reshape(shape), *args)
        out.copy_(result.view(out.shape))


def _scalars(values, like: torch.Tensor) -> torch.Tensor:
    """Weights, thresholds, ... as one tensor (a compiled kernel is not recompiled for new values)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64 if like.dtype == torch.float64 else torch.float32, device=like.device)


PROBE_SAMPLE = 1 << 14  # entries sampled per tensor and shard for the first guess of the threshold
PROBE_RUN = 64  # the sample is taken in aligned runs of this many neighbouring entries (a cache line or two each, not one per entry)
PROBE_PASSES = 40  # passes over a tensor before the selection falls back to sorting everything


def magnitude_thresholds(base: torch.Tensor, sources: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """Per shard, the magnitude of its task vector's k-th largest entry, k = int(density n) (TIES'
    trim keeps |t_i| >= it: the entries peft's `magnitude_based_pruning` keeps, and any tied with the
    k-th). +inf keeps nothing, 0 keeps all.

    Exact, in a few passes over the tensor and no temporaries: a sample gives the first guess; each
    pass (`_probe_kernel`) tries one or two magnitudes per shard still open, counting the entries at
    or above each and above each (a value is the k-th when the first count reaches k and the second
    does not) and reporting the nearest values on either side, which narrows the interval holding
    the k-th value to values it has seen. A shard leaves the passes once its value is found; after
    the first pass each open shard is probed alone (so the kernel is compiled twice in all, not once
    per number of shards left).
    SD-1.5-shaped fp16 deltas (they tie on few values): the first pass, one magnitude per shard,
    finds 601 of the 681 values (227 tensors, 3 shards), the second the other 80."""
    n, k = base.numel(), int(density * base.numel())
    if k >= n:
        return _scalars([0.0] * len(sources), base)
    if k <= 0:
        return _scalars([math.inf] * len(sources), base)
    b = base.reshape(-1)
    if n < FUSED_MIN_ELEMENTS:  # one selection for all shards (a row each)
        return kth_smallest(torch.stack([(_acc(s).reshape(-1) - _acc(b)).abs() for s in sources]), n - k)
    run = min(PROBE_RUN, n)
    picked = torch.randint(n // run, (max(1, PROBE_SAMPLE // run),), generator=torch.Generator("cpu").manual_seed(n)).to(base.device)
    runs = lambda t: t.reshape(-1)[: n // run * run].view(-1, run).index_select(0, picked)  # noqa: E731  rows of neighbours, copied whole
    drawn = (_acc(torch.stack([runs(s) for s in sources])) - _acc(runs(b))).abs().view(len(sources), -1).cpu().numpy()
    m = drawn.shape[1]
    spread = n * (4 * math.sqrt((k / n) * (1 - k / n) / m) + 1 / m)  # the sample's guess is this many entries off, almost never more

    def at(count: float) -> int:
        """The sample's position (ascending) of the magnitude with about `count` of n entries at or above it."""
        return min(m, max(1, m - round(count * m / n) + 1)) - 1

    @functools.cache
    def sample() -> torch.Tensor:
        """The sample sorted, row by row (numpy's sort: 3x torch's here); sorted when a second pass needs it."""
        return torch.from_numpy(numpy.sort(drawn, axis=1))

    def guess(row: int, count: float) -> float:
        """The sample's magnitude with about `count` of n entries at or above it."""
        return float(sample()[row, at(count)])

    def within(row: int) -> float | None:
        """The sample's magnitude between lo and below_hi with the share of their entries above it that
        the k-th needs (the sample sees where the entries lie, ties included); None if it holds
        too few there to say."""
        edges = torch.tensor([lo[row], below_hi[row]], dtype=sample().dtype)
        first, last = torch.searchsorted(sample()[row], edges[:1]).item(), torch.searchsorted(sample()[row], edges[1:], right=True).item()
        if last - first < 8:
            return None
        share = (k - hi_count[row]) / max(lo_count[row] - hi_count[row], 1)  # of the entries in [lo, below_hi], above the k-th
        return float(sample()[row, min(last - 1, max(first, last - round(share * (last - first))))])

    def linear(row: int) -> float:
        """Where the count reaches k if it falls linearly in the magnitude between lo and below_hi."""
        return lo[row] + (below_hi[row] - lo[row]) * (lo_count[row] - k + 0.5) / max(lo_count[row] - hi_count[row], 1)

    def tries(row: int, step: int) -> list[float]:
        """This pass's two magnitudes for shard `row` (after the first): lo or below_hi is often the
        k-th itself (fp16 deltas tie on few values, and a pass reports the values next to its
        magnitude), the others close in from the side not yet bounded or inside the interval."""
        if math.isinf(below_hi[row]):  # nothing is known to be too high yet: is lo the k-th? and further up
            return [lo[row], guess(row, k - spread * 4 ** (step - 1))]
        if lo_count[row] == n and lo[row] == 0.0:  # nor too low: is below_hi the k-th? and further down
            return [below_hi[row], guess(row, k + spread * 4 ** (step - 1))]
        if step % 4 == 3:  # now and then halve the interval (guesses can creep up on one side)
            return [(lo[row] + below_hi[row]) / 2, linear(row)]
        inside = within(row)
        return [linear(row), (lo[row] + below_hi[row]) / 2] if inside is None else [inside, linear(row)]

    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32  # the precision the kernel compares in
    found: list[float | None] = [None] * len(sources)
    lo = [0.0] * len(sources)  # a magnitude with lo_count >= k entries at or above it (0: all n)
    lo_count = [n] * len(sources)
    below_hi = [math.inf] * len(sources)  # a magnitude with hi_count < k entries above it (inf: none seen yet)
    hi_count = [0] * len(sources)
    first = numpy.partition(drawn, at(k), axis=1)[:, at(k)]  # the first guess needs one position of the sample: no sort
    candidates = [[float(first[i])] for i in range(len(sources))]
    for step in range(PROBE_PASSES):
        rows = [i for i in range(len(sources)) if found[i] is None]
        tried = _scalars([c for i in rows for c in candidates[i]], base).view(len(rows), -1)  # as the kernel compares them
        if step == 0:  # every shard, one magnitude each
            probed = _run(_probe_kernel, b, _flat([sources[i] for i in rows], n), list(tried.T))
        else:  # each shard still open alone: two compiled variants in all, whatever the shards left
            parts = [_run(_probe_kernel, b, _flat([sources[i]], n), list(tried[r : r + 1].T)) for r, i in enumerate(rows)]
            probed = [torch.cat([part[q] for part in parts]) for q in range(4)]
        at_least, above, smallest, below = (x.tolist() for x in probed)
        for r, i in enumerate(rows):
            for j, c in enumerate(tried[r].tolist()):
                if at_least[r][j] >= k > above[r][j]:  # c is the k-th value
                    found[i] = c
                    break
                if above[r][j] >= k and smallest[r][j] > lo[i]:  # the k-th is above c: at least the smallest value there
                    lo[i], lo_count[i] = smallest[r][j], above[r][j]
                elif at_least[r][j] < k and below[r][j] < below_hi[i]:  # below c: at most the largest value there
                    below_hi[i], hi_count[i] = below[r][j], at_least[r][j]
            if found[i] is None and lo[i] == below_hi[i]:  # one value left between them
                found[i] = lo[i]
            if found[i] is None:  # within [lo, below_hi], in the precision the kernel compares in
                candidates[i] = [min(max(float(torch.tensor(c, dtype=dtype)), lo[i]), below_hi[i]) for c in tries(i, step + 1)]
        if all(f is not None for f in found):
            return _scalars(found, base)
    logger.debug("magnitude selection did not settle in %d passes: sorting", PROBE_PASSES)
    return torch.stack([torch.kthvalue((_acc(s).reshape(-1) - _acc(b)).abs(), n - k + 1).values for s in sources])


def kth_smallest(rows: torch.Tensor, index: int) -> torch.Tensor:
    """Each row's value at 0-based `index` in ascending order (`torch.kthvalue`'s); on the CPU by
    numpy's partition, about twice as fast here."""
    if rows.device.type != "cpu":
        return torch.kthvalue(rows, index + 1, dim=1).values
    return torch.from_numpy(numpy.partition(rows.numpy(), index, axis=1)[:, index].copy())


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """True for the int(density n) entries of largest magnitude and any tied with the last of them."""
    threshold = magnitude_thresholds(torch.zeros_like(delta), [delta], density)[0]
    return delta.abs() >= threshold.to(delta.dtype)


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


def _add_difference_order(names: list[str], p: AddDifferenceParams) -> list[int]:
    """A and B in row order, then C when it is a shard; ValueError when the selection does not fit."""
    if p.c != "base" and p.c not in names:
        raise ValueError(f"add-difference: c = {p.c!r}: not one of the selected shards ({', '.join(names)}) nor 'base'")
    if len(names) != (2 if p.c == "base" else 3):
        raise ValueError(f"add-difference merges A + alpha (B - C): select 2 shards with c = 'base', or 3 with c naming one; {len(names)} selected")
    return [i for i, n in enumerate(names) if n != p.c] + ([names.index(p.c)] if p.c != "base" else [])


def _add_difference_coefficients(weights, p: AddDifferenceParams):
    # Sources come in _add_difference_order: A, B (and C when it is a shard): A + alpha (B - C).
    if p.c == "base":
        return [1.0, p.alpha], -p.alpha
    return [1.0, p.alpha, -p.alpha], 0.0


def _add_difference_block(weights, multipliers, p: AddDifferenceParams):
    """Per block, alpha times B's multiplier (A1111's MBW add difference); A and C are taken whole."""
    fixed = [m for i, m in enumerate(multipliers) if i != 1 and m != 1]
    if fixed:
        raise ValueError("add-difference takes block weights on B only (they scale alpha per block); A and C are taken whole")
    return tuple(weights), p.model_copy(update={"alpha": p.alpha * multipliers[1]})


merge_method(
    "add-difference", summary="A + alpha (B - C), C the base or a chosen shard; the weights are not used",
    reference="AUTOMATIC1111's checkpoint merger ('Add difference')", params=AddDifferenceParams,
    coefficients=_add_difference_coefficients, min_shards=2, max_shards=3, arrange=_add_difference_order, blocked=_add_difference_block,
)(None)


@merge_method(
    "ties", summary="base + lambda x TIES(trim to density, elect sign, disjoint mean of t_i = theta_i - base)",
    reference="Yadav et al. 2023, TIES-Merging (arXiv 2306.01708), as mergekit formulates it", params=TiesParams,
)
def ties(out, sources, weights, base, p: TiesParams, draws=None, stats=None):
    """Trim each task vector to its `density` largest entries, elect the sign of the weighted sum,
    and average (weighted) the entries that agree with it. `stats`: the shards' thresholds, known already."""
    thresholds = stats if stats is not None else magnitude_thresholds(base, sources, p.density)
    _into(_ties_into, out, base, list(sources), thresholds, _scalars(weights, base), _scalars([p.lambda_], base)[0])


def small_thresholds(bases: Sequence[torch.Tensor], sources: Sequence[Sequence[torch.Tensor]], density: float) -> torch.Tensor:
    """`magnitude_thresholds` of many small tensors at once, (shards, tensors): the tensors of one
    size share one selection (a row per shard and tensor), so the values are the same as one by one."""
    out = torch.empty(len(sources), len(bases), dtype=_acc(bases[0]).dtype, device=bases[0].device)
    by_size: dict[int, list[int]] = {}
    for j, b in enumerate(bases):
        by_size.setdefault(b.numel(), []).append(j)
    for n, js in by_size.items():
        k = int(density * n)
        if k >= n or k <= 0:
            out[:, js] = 0.0 if k >= n else math.inf
            continue
        deltas = _cat([shard[j] for shard in sources for j in js]).view(len(sources), len(js), n) - _cat([bases[j] for j in js]).view(1, len(js), n)
        rows = deltas.abs().view(-1, n)  # a row per shard and tensor
        out[:, js] = kth_smallest(rows, n - k).view(len(sources), len(js))
    return out


def ties_batch(outs, sources, weights, bases, p: TiesParams, stats=None) -> None:
    """TIES over many small tensors in one eager pass (their thresholds per tensor, as `ties` takes
    them; the same values as tensor by tensor: every step is elementwise). `stats`: the thresholds,
    (shards, tensors), known already."""
    thresholds = stats if stats is not None else small_thresholds(bases, sources, p.density)
    sizes = [b.numel() for b in bases]
    base = _cat(bases)
    flat = [_cat(shard) for shard in sources]
    counts = torch.tensor(sizes, device=base.device)
    per_entry = [torch.repeat_interleave(thresholds[i].to(base.device), counts) for i in range(len(sources))]
    merged = _run(_ties_kernel, base, flat, per_entry, _scalars(weights, base), _scalars([p.lambda_], base)[0])
    for out, piece in zip(outs, merged.split(sizes)):
        _write(out, piece)


def ties_stats(bases, shard, p: TiesParams) -> torch.Tensor:
    """One shard's thresholds of these tensors (they depend on the shard, the base and the density
    alone: cached across mixes, so a new weight selects nothing again)."""
    if len(bases) == 1 and bases[0].numel() >= FUSED_MIN_ELEMENTS:
        return magnitude_thresholds(bases[0], shard, p.density)
    return small_thresholds(bases, [shard], p.density)[0]


METHODS["ties"] = dataclass_replace(METHODS["ties"], batch=ties_batch, stats=ties_stats, stats_key=lambda p: ("density", p.density))


@merge_method(
    "dare", summary="base + lambda sum_i w_i DARE(t_i): keep each entry with probability density, rescale by 1/density",
    reference="Yu et al. 2024, Language models are Super Mario (DARE, arXiv 2311.03099)", params=DareParams, random=True,
)
def dare(out, sources, weights, base, p: DareParams, draws: Draws):
    """Drop and rescale each task vector, then task arithmetic (density 1 is task arithmetic)."""
    _dropped(out, base, sources, weights, p, draws, [p.density] * len(sources), elect=False)


def _torch_draws(base: torch.Tensor, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """rng 'torch': one uniform draw per entry and shard, on the CPU (the same on every device), in shard order."""
    return [torch.rand(base.shape, generator=generator, dtype=torch.float32).to(base.device) for _ in range(count)]


def _dropped(out, base, sources, weights, p, draws: Draws, probabilities: list, elect: bool) -> None:
    """out <- DARE / DARE-TIES / DELLA of one tensor, with these keep probabilities."""
    keep = [pr if isinstance(pr, torch.Tensor) else _scalars([pr], base)[0] for pr in probabilities]
    w, lam = _scalars(weights, base), _scalars([p.lambda_], base)[0]
    if p.rng == "torch":
        _into(_dropped_into, out, base, list(sources), _torch_draws(base, len(sources), draws.generator()), keep, w, lam, elect)
    else:
        key = torch.tensor(draws.key, dtype=torch.int32, device=base.device)
        _into(_counted_into, out, base, list(sources), key, keep, w, lam, elect)


@merge_method(
    "dare-ties", summary="base + lambda x TIES' sign election over DARE(t_i)",
    reference="Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES), as mergekit's dare_ties", params=DareParams, random=True,
)
def dare_ties(out, sources, weights, base, p: DareParams, draws: Draws):
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    _dropped(out, base, sources, weights, p, draws, [p.density] * len(sources), elect=True)


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


def _dropped_batch(elect: bool, probabilities: Callable | None):
    """The batch function of DARE (elect False), DARE-TIES and DELLA (elect True): each tensor's draws
    (its counters, or its own generator) and its keep probabilities (DELLA's ranks per tensor and
    row), then one pass over all of them (compiled from 2^18 entries on, as `_run` does): the same
    values as tensor by tensor."""

    def batch(outs, sources, weights, bases, p, draws: list[Draws]) -> None:
        sizes = [b.numel() for b in bases]
        base = _cat(bases)
        flat = [_cat(shard) for shard in sources]
        if probabilities is None:
            keep = [_scalars([p.density], base)[0]] * len(sources)
        else:
            keep = [torch.cat([q.reshape(-1) for q in probabilities([_acc(t) - _acc(b) for t, b in zip(shard, bases)], p)]) for shard in sources]
        w, lam = _scalars(weights, base), _scalars([p.lambda_], base)[0]
        if p.rng == "torch":
            per_tensor = [_torch_draws(b, len(sources), d.generator()) for b, d in zip(bases, draws)]  # in the order tensor by tensor draws them
            uniforms = [torch.cat([u[i].reshape(-1) for u in per_tensor]) for i in range(len(sources))]
            merged = _run(_dropped_kernel, base, flat, uniforms, keep, w, lam, elect)
        else:  # entry j of a tensor starting at s counts j - s + its key
            starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
            keys = torch.tensor([_int32(d.key - s) for d, s in zip(draws, starts.tolist())], dtype=torch.int32)
            merged = _run(_counted_kernel, base, flat, torch.repeat_interleave(keys, torch.tensor(sizes)).to(base.device), keep, w, lam, elect)
        for out, piece in zip(outs, merged.split(sizes)):
            _write(out, piece)

    return batch


METHODS["dare"] = dataclass_replace(METHODS["dare"], batch=_dropped_batch(False, None))
METHODS["dare-ties"] = dataclass_replace(METHODS["dare-ties"], batch=_dropped_batch(True, None))


@merge_method(
    "della", summary="base + lambda x TIES' sign election over t_i kept with probability ranked by magnitude (density +- epsilon), rescaled",
    reference="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617), as mergekit's della", params=DellaParams, random=True,
)
def della(out, sources, weights, base, p: DellaParams, draws: Draws):
    """MagPrune: larger entries are more likely kept; each kept entry is rescaled by 1 / its keep
    probability; then sign election and the disjoint mean."""
    if p.ranks == "exact" or p.rng == "torch":
        b = _acc(base)
        _dropped(out, base, sources, weights, p, draws, [_della_probabilities(_acc(s) - b, p) for s in sources], elect=True)
        return
    rows = _rows(base)
    values = _scalars([p.lambda_, p.density, p.epsilon], base)
    knots, slopes = row_knots(base.reshape(rows), [s.reshape(rows) for s in sources])
    key = torch.tensor(draws.key, dtype=torch.int32, device=base.device)
    _into(_della_into, out, base, [s.reshape(rows) for s in sources], key, list(knots), list(slopes), _scalars(weights, base), values, rows=rows)


def _della_into(out, base, sources: list, key, knots: list, slopes: list, weights, values) -> None:
    """out <- DELLA with sampled ranks and counter draws over rows (out, base, sources: rows x L; each
    shard's knots and slopes: rows x RANK_KNOTS + 1 and rows x RANK_KNOTS; values = (lambda, density,
    epsilon)), in one pass: each entry's keep probability is computed where it is used (written out
    and read back, the probabilities took longer than the merge). Entry (r, c) counts r L + c + key,
    as `_counted_kernel` counts the flat index: the same draws."""
    rows, length = base.shape
    at = torch.arange(rows, dtype=torch.int32, device=base.device).view(-1, 1) * length + torch.arange(length, dtype=torch.int32, device=base.device)
    uniforms = counter_uniforms(at + key, len(sources))
    b = _acc(base)
    deltas = []
    for i, s in enumerate(sources):
        d = _acc(s) - b
        keep = _keep(sampled_rank(d.abs(), knots[i], slopes[i]), values)
        deltas.append(torch.where(uniforms[i] < keep, d / torch.where(keep > 0, keep, 1.0), 0.0))
    out.copy_(b + values[0] * sign_consensus(deltas, weights))


RANK_SAMPLE = 64  # entries per row that DELLA's sampled ranks are read from
RANK_KNOTS = 4  # pieces of the piecewise-linear rank curve through them


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """DELLA's rows: the tensor viewed as (shape[0], -1); a vector is one row."""
    return (t.shape[0], t.numel() // t.shape[0]) if t.dim() > 1 else (1, t.numel())


def row_knots(base: torch.Tensor, sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per shard and row of |source - base| (each rows x L), RANK_KNOTS + 1 magnitudes that split an
    evenly strided sample of RANK_SAMPLE of its entries into equal shares (the first its smallest,
    the last its largest), and the slope of each piece (1 / its width; a huge one for a piece of
    width 0, a step): (shards, rows, RANK_KNOTS + 1) and (shards, rows, RANK_KNOTS). The samples are
    strided views (no gather), converted and sorted for all shards at once (on the CPU by numpy)."""
    step = max(1, base.shape[1] // RANK_SAMPLE)
    pick = lambda t: t[:, ::step][:, :RANK_SAMPLE]  # noqa: E731
    sample = (_acc(torch.stack([pick(s) for s in sources])) - _acc(pick(base))).abs()
    at = [round(j * (sample.shape[-1] - 1) / RANK_KNOTS) for j in range(RANK_KNOTS + 1)]
    if sample.device.type == "cpu":
        knots = torch.from_numpy(numpy.sort(sample.numpy(), axis=-1)[..., at])
    else:
        knots = sample.sort(dim=-1).values[..., at]
    widths = knots[..., 1:] - knots[..., :-1]
    return knots, torch.where(widths > 0, 1.0 / torch.where(widths > 0, widths, 1.0), 1e30)


def sampled_rank(a: torch.Tensor, knots: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Each entry's share of its row below it (0 to 1), read off the piecewise-linear curve through
    its row's knots: a (rows x L), knots (rows x RANK_KNOTS + 1)."""
    share = torch.zeros_like(a)
    for j in range(RANK_KNOTS):
        share = share + ((a - knots[:, j : j + 1]) * slopes[:, j : j + 1]).clamp(0.0, 1.0)
    return share * (1.0 / RANK_KNOTS)


def sampled_probabilities(base: torch.Tensor, source: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """DELLA's keep probabilities of |source - base| (rows x L) with sampled ranks; values = (lambda,
    density, epsilon)."""
    knots, slopes = row_knots(base, [source])
    return _run(_ranked_kernel, base, source, knots[0], slopes[0], values)


def _ranked_kernel(base, source, knots, slopes, values):
    """DELLA's keep probabilities with sampled ranks over rows (base, source: rows x L), values =
    (lambda, density, epsilon)."""
    return _keep(sampled_rank((_acc(source) - _acc(base)).abs(), knots, slopes), values)


def _keep(share: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Keep probabilities from rank shares: density - epsilon + 2 epsilon x share (values = (lambda, density, epsilon))."""
    return values[1] - values[2] + 2 * values[2] * share


def _della_probabilities(delta: torch.Tensor, p: DellaParams) -> torch.Tensor:
    """One tensor's keep probabilities, exact or sampled ranks, computed as `della`'s kernel does
    (the batch of small tensors and the 'torch' draws take them from here)."""
    if p.ranks == "exact":
        return rank_probabilities(delta, p.density, p.epsilon)
    rows = _rows(delta)
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device).expand(rows)
    return sampled_probabilities(zero, delta.reshape(rows), _scalars([p.lambda_, p.density, p.epsilon], delta)).reshape(delta.shape)


def _della_probabilities_of(deltas: list[torch.Tensor], p: DellaParams) -> list[torch.Tensor]:
    """`_della_probabilities` of many small tensors (the batch's): with sampled ranks, the rows of one
    length in one pass (a row's knots and probabilities depend on its row alone: the same values;
    SD-1.5's 459 small tensors have few row lengths, and one by one they took a sixth of DELLA's time)."""
    if p.ranks == "exact":
        return [_della_probabilities(d, p) for d in deltas]
    values = _scalars([p.lambda_, p.density, p.epsilon], deltas[0])
    by_length: dict[int, list[int]] = {}
    for j, d in enumerate(deltas):
        by_length.setdefault(_rows(d)[1], []).append(j)
    out: list[torch.Tensor] = [deltas[0]] * len(deltas)
    for js in by_length.values():
        rows = torch.cat([deltas[j].reshape(_rows(deltas[j])) for j in js])
        zero = torch.zeros((), dtype=rows.dtype, device=rows.device).expand(rows.shape)
        knots, slopes = row_knots(zero, [rows])
        kept = _ranked_kernel(zero, rows, knots[0], slopes[0], values)  # eager, as each small tensor alone ran
        for j, piece in zip(js, kept.split([_rows(deltas[j])[0] for j in js])):
            out[j] = piece.reshape(deltas[j].shape)
    return out


METHODS["della"] = dataclass_replace(METHODS["della"], batch=_dropped_batch(True, _della_probabilities_of))


DOT_THRESHOLD = 0.9995  # mergekit's: above it the two tensors count as parallel and are interpolated linearly


@merge_method(
    "slerp", summary="spherical interpolation of two shards per tensor, t = the second shard's weight (linear when near-parallel)",
    reference="Shoemake 1985; mergekit's slerp", needs_base=False, min_shards=2, max_shards=2,
)
def slerp(out, sources, weights, base, p: NoParams, draws=None):
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
def model_stock(out, sources, weights, base, p: NoParams, draws=None):
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
@dataclass(frozen=True)
class Part:
    """Tensors merged with one set of weights and parameters (a block of a block-weighted mix);
    weights None: they keep the base's weights."""

    names: tuple[str, ...]
    weights: tuple[float, ...] | None
    params: Params


def restrict(parts: Sequence[Part], names) -> list[Part]:
    """The parts of these tensors only (a streamed export merges a group of tensors at a time)."""
    keep = set(names)
    out = [Part(tuple(n for n in p.names if n in keep), p.weights, p.params) for p in parts]
    return [p for p in out if p.names]


@torch.no_grad()
def merge_into(
    target: Tensors, method_: MergeMethod, params: Params, sources: Sequence[Tensors], weights: Sequence[float],
    base: Tensors | None = None, fused: bool | None = None, progress: Callable[[float], None] | None = None,
    parts: Sequence[Part] | None = None, memo: MutableMapping | None = None, keys: Sequence | None = None,
) -> None:
    """Merge `sources` (normalized `weights`) into `target` in place with a registered method.

    `memo` and `keys` (each source's content key; the base is the memo owner's): per-shard
    statistics that do not depend on the mix (TIES' thresholds) are kept there across mixes, so a
    new weight recomputes none of them.

    `parts` (block weights): tensors merged with their own weights and parameters, together covering
    `target`; by default one part of everything with `weights` and `params`. Linear methods are one
    weighted sum (`soup.weighted_sum_parts`: one pass over flat buffers, one range per part); the
    others run tensor by tensor (lazily read sources, lean or pinned, are resident one tensor each).
    Everything is checked before the first write."""
    from . import soup

    if parts is None:
        parts = [Part(tuple(target), tuple(weights), params)]
    elif sorted(n for p in parts for n in p.names) != sorted(target):
        raise ValueError("the parts do not cover the target's tensors exactly once")
    if (method_.needs_base or any(p.weights is None for p in parts)) and base is None:
        raise ValueError(f"{method_.name} needs the base weights")
    if method_.linear:
        with_base = []
        for p in parts:
            if p.weights is None:  # the base's weights
                with_base.append((p.names, [0.0] * len(sources), 1.0))
            else:
                coefficients, base_coefficient = method_.coefficients(list(p.weights), p.params)
                with_base.append((p.names, coefficients, base_coefficient))
        extra = [base] if any(b for _, _, b in with_base) else []
        soup.weighted_sum_parts(target, [*sources, *extra], [(n, [*c, *([b] if extra else [])]) for n, c, b in with_base], fused)
        return
    soup.check_compatible(target, [*sources, *([base] if base is not None else [])])
    read_order = getattr(sources[0], "read_order", None)  # lazy sources: walk their files front to back
    names = list(target)
    if callable(read_order):
        rank = {n: i for i, n in enumerate(read_order())}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    part_of = {n: p for p in parts for n in p.names}
    known = _Stats(method_, sources, base, memo, keys) if method_.stats is not None and memo is not None and keys is not None else None
    if method_.batch is not None:  # small tensors of one part in a few eager passes
        names = _merge_batches(target, method_, sources, base, part_of, names, known)
    for i, name in enumerate(names):
        out, part = target[name], part_of[name]
        if not out.is_floating_point():  # integer buffers (counters): the first source's
            out.copy_(sources[0][name])
        elif part.weights is None:
            out.copy_(base[name])
        else:
            draws = _draws_of(part.params, name) if method_.random else None
            extra = {"stats": known.get([name], part.params)[:, 0]} if known is not None else {}
            method_.fn(out, [s[name] for s in sources], list(part.weights), base[name] if base is not None else None, part.params, draws, **extra)
        if progress is not None:
            progress((i + 1) / len(names))


def _draws_of(params: Params, name: str) -> Draws:
    return Draws(getattr(params, "seed", 0), name)


BATCH_ELEMENTS = 1 << 18  # elements per batched pass (bounds its temporaries: a few times this per shard)


class _Stats:
    """A method's per-shard statistics of tensors, from the memo or computed (and kept) there."""

    def __init__(self, method_: MergeMethod, sources, base, memo: MutableMapping, keys: Sequence):
        self.method, self.sources, self.base, self.memo, self.keys = method_, sources, base, memo, keys

    def get(self, names: list[str], params: Params) -> torch.Tensor:
        """(shards, tensors) of these tensors under these parameters."""
        out = []
        for shard, key in zip(self.sources, self.keys):
            memo_key = lambda n: (self.method.name, self.method.stats_key(params), key, n)  # noqa: E731
            missing = [n for n in names if memo_key(n) not in self.memo]
            if missing:
                values = self.method.stats([self.base[n] for n in missing], [shard[n] for n in missing], params)
                for n, v in zip(missing, values.tolist()):
                    self.memo[memo_key(n)] = v
            out.append([self.memo[memo_key(n)] for n in names])
        like = self.base[names[0]]
        return torch.tensor(out, dtype=_acc(like).dtype, device=like.device)


def _merge_batches(target, method_: MergeMethod, sources, base, part_of, names: list[str], known: _Stats | None = None) -> list[str]:
    """Merge the floating tensors under FUSED_MIN_ELEMENTS with the method's batch function, a part
    at a time in passes of about BATCH_ELEMENTS; returns the names left for the per-tensor loop."""
    rest, groups = [], {}
    for name in names:
        out, part = target[name], part_of[name]
        if out.is_floating_point() and out.numel() < FUSED_MIN_ELEMENTS and part.weights is not None:
            groups.setdefault(id(part), (part, []))[1].append(name)
        else:
            rest.append(name)
    for part, members in groups.values():
        batch, size = [], 0
        for j, name in enumerate(members):
            batch.append(name)
            size += target[name].numel()
            if size >= BATCH_ELEMENTS or j + 1 == len(members):
                args = [[target[n] for n in batch], [[s[n] for n in batch] for s in sources], list(part.weights), [base[n] for n in batch], part.params]
                if method_.random:  # each tensor's own draws, as tensor by tensor
                    args.append([_draws_of(part.params, n) for n in batch])
                method_.batch(*args, **({"stats": known.get(batch, part.params)} if known is not None else {}))
                batch, size = [], 0
    return rest
