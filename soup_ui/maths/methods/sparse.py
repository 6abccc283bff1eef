"""The sparse methods: TIES, DARE, DARE-TIES and DELLA, each registered once with its batch
function (many small tensors in one pass) and, for TIES, its per-shard thresholds cached across mixes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy
import torch

from .draws import Draws, _int32, counter_uniforms
from .kernels import (
    _acc,
    _cat,
    _counted_into,
    _counted_kernel,
    _dropped_into,
    _dropped_kernel,
    _into,
    _run,
    _scalars,
    _ties_into,
    _ties_kernel,
    _write,
    runs_fused,
    sign_consensus,
)
from .registry import DareParams, DellaParams, TiesParams, merge_method
from .selection import magnitude_thresholds, small_thresholds

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


def ties(out, sources, weights, base, p: TiesParams, draws=None, stats=None):
    """Trim each task vector to its `density` largest entries, elect the sign of the weighted sum,
    and average (weighted) the entries that agree with it. `stats`: the shards' thresholds, known already."""
    thresholds = stats if stats is not None else magnitude_thresholds(base, sources, p.density)
    _into(_ties_into, out, base, list(sources), thresholds, _scalars(weights, base), _scalars([p.lambda_], base)[0])


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
    if len(bases) == 1 and runs_fused(bases[0].numel()):
        return magnitude_thresholds(bases[0], shard, p.density)
    return small_thresholds(bases, [shard], p.density)[0]


merge_method(
    "ties", summary="base + lambda x TIES(trim to density, elect sign, disjoint mean of t_i = theta_i - base)",
    reference="Yadav et al. 2023, TIES-Merging (arXiv 2306.01708), as mergekit formulates it", params=TiesParams,
    batch=ties_batch, stats=ties_stats, stats_key=lambda p: ("density", p.density),
)(ties)


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


merge_method(
    "dare", summary="base + lambda sum_i w_i DARE(t_i): keep each entry with probability density, rescale by 1/density",
    reference="Yu et al. 2024, Language models are Super Mario (DARE, arXiv 2311.03099)", params=DareParams, random=True,
    batch=_dropped_batch(False, None),
)(dare)
merge_method(
    "dare-ties", summary="base + lambda x TIES' sign election over DARE(t_i)",
    reference="Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES), as mergekit's dare_ties", params=DareParams, random=True,
    batch=_dropped_batch(True, None),
)(dare_ties)


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


merge_method(
    "della", summary="base + lambda x TIES' sign election over t_i kept with probability ranked by magnitude (density +- epsilon), rescaled",
    reference="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617), as mergekit's della", params=DellaParams, random=True,
    batch=_dropped_batch(True, _della_probabilities_of),
)(della)
