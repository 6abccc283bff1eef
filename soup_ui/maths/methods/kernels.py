"""The shared steps and per-tensor kernels of the non-linear methods (TIES' election, DARE's drop,
DELLA's ranked drop), run compiled for large tensors and batches of small ones, eager otherwise;
compiled and eager do the same float32 operations in the same order."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from .draws import counter_uniforms

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


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


FUSED_MIN_ELEMENTS = 1 << 18  # tensors from this size on run compiled (SD's larger tensors); smaller ones eager
# Inductor realizes an intermediate read twice (TIES' agree masks) as its own loop node; a node that
# loads no fp16 makes the whole fused loop run 8 float lanes wide, reading fp16 through partial
# (copied) vector loads: DARE-TIES on fp16 took 2-3x as long. Inlined, every node reads fp16 and the
# loop runs 16 wide; the operations and their order are the same (tested: the same weights).
COMPILE_OPTIONS = {"realize_opcount_threshold": 1 << 14, "realize_reads_threshold": 1 << 14, "realize_acc_reads_threshold": 1 << 14}
_compiled: dict[str, Callable] = {}
_failed: list[str] = []  # why compiling failed, once: then everything runs eager
_thread = threading.local()  # .eager: this thread's merges run eager (`eager()`)


@contextmanager
def eager() -> Iterator[None]:
    """Every kernel this thread runs inside runs eager: a model too small for compiling to pay (the
    embedded default's 6 shards merge eager in 0.9 s with TIES, 0.7 s with DELLA; their first
    compiled merge took 10 s and 220 s), or a method whose kernels still compile in the background (`warm`)."""
    before = getattr(_thread, "eager", False)
    _thread.eager = True
    try:
        yield
    finally:
        _thread.eager = before


def runs_fused(numel: int) -> bool:
    """Whether `numel` entries (a tensor, or a batch of small ones) run through a compiled kernel; the
    bound is read at call time, so a test can lower it for the whole package."""
    return numel >= FUSED_MIN_ELEMENTS


def _run(kernel: Callable, *args):
    """kernel(*args), compiled for large tensors and batches of small ones (one variant per shard
    count and dtype, compiled on first use under soup.TRACING, like the soup kernel); eager for
    smaller ones (a small model's mix compiles nothing) or if compiling fails. Compiled and eager
    kernels do the same float32 operations in the same order (tested: the same weights)."""
    from .. import soup

    if not runs_fused(args[0].numel()) or _failed or getattr(_thread, "eager", False):
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
