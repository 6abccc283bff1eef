"""TIES' exact magnitude selection (kept by hand: `torch.kthvalue` over every entry of every shard is
several times slower): the k-th largest |t_i| of each shard found by counting passes over the tensor,
guided by a sample, exact (the same threshold as a full sort; tested against torch.kthvalue)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence

import numpy
import torch

from .kernels import _acc, _cat, _flat, _run, _scalars, runs_fused

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


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
    if not runs_fused(n):  # one selection for all shards (a row each)
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
