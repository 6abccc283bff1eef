"""The soup maths: weighted averages of parameter tensors, in place. Torch only: no files, no UI.

Diffusion Soup (Biggs et al. 2024, Eq. 2): theta_soup = sum_i w_i theta_i / sum_i w_i. With equal
weights this is the uniform soup; the paper shows it approximately samples from the geometric
mean of the shards' distributions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


MAX_WEIGHT = 100.0  # the largest weight a mix, a recipe or a preset takes (a slider's share, not a scale)


def checked_weight(label: str, w) -> float:
    """`w` as a float, or ValueError naming `label` when it is not a number from 0 to MAX_WEIGHT."""
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"weight of {label} must be a number, got {w!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"weight of {label} must be finite, got {w}")
    if not 0 <= w <= MAX_WEIGHT:
        raise ValueError(f"weight of {label} must be between 0 and {MAX_WEIGHT:g}, got {w:g}")
    return w


def normalize_weights(weights: Sequence[float], names: Sequence[str] | None = None) -> list[float]:
    """Check mixing weights (finite, 0 to MAX_WEIGHT, positive sum) and scale them to sum to 1.

    Raises ValueError naming the offending weight; `names` label the weights in messages.
    """
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(weights))]
    if len(weights) == 0:
        raise ValueError("no shard selected: select at least one shard to mix")
    if len(labels) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(labels)} names")
    values = [checked_weight(label, w) for label, w in zip(labels, weights)]
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("the weights sum to zero: give at least one selected shard a positive weight")
    return [w / total for w in values]


class FlatTensors(Mapping):
    """Named tensors that are views into one contiguous 1-D buffer (all one dtype and device).

    A soup over FlatTensors of the same layout is one pass over K buffers instead of hundreds of
    per-tensor calls (SD 2.1's UNet has 686 tensors), which is what lets `average_into` reach the
    memory-bandwidth bound. Build one with `FlatTensors.pack` or `flatten_module`.
    """

    def __init__(self, buffer: torch.Tensor, layout: dict[str, tuple[int, tuple[int, ...]]]):
        self.buffer, self.layout = buffer, layout  # layout: name -> (offset, shape)
        self._views = {n: buffer[o : o + math.prod(shape)].view(shape) for n, (o, shape) in layout.items()}

    @classmethod
    def empty(cls, shapes: Mapping[str, Sequence[int]], dtype: torch.dtype, device: str | torch.device = "cpu") -> FlatTensors:
        layout, offset = {}, 0
        for name, shape in shapes.items():
            layout[name] = (offset, tuple(shape))
            offset += math.prod(shape)
        return cls(torch.empty(offset, dtype=dtype, device=device), layout)

    @classmethod
    def pack(cls, tensors: Tensors) -> FlatTensors:
        """Copy `tensors` (floating point, one dtype and device) into one new buffer."""
        kinds = {(t.dtype, t.device) for t in tensors.values()}
        if len(kinds) != 1 or not all(t.is_floating_point() for t in tensors.values()):
            raise ValueError(f"FlatTensors need floating-point tensors of one dtype and device, got {sorted(map(str, kinds))}")
        dtype, device = kinds.pop()
        flat = cls.empty({n: t.shape for n, t in tensors.items()}, dtype, device)
        for name, tensor in tensors.items():
            flat[name].copy_(tensor)
        return flat

    def same_layout(self, other) -> bool:
        return isinstance(other, FlatTensors) and other.layout == self.layout and other.buffer.device == self.buffer.device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._views[name]

    def __iter__(self):
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


@torch.no_grad()
def flatten_module(module: torch.nn.Module, order: Sequence[str] | None = None) -> Tensors:
    """Move a module's parameters and buffers into one flat buffer; returns its tensors by state-dict name.

    `order`: the tensors' order in the buffer (default: the state dict's; the studio orders them by
    block, so that each block is one contiguous range). The module keeps working (its tensors become
    views of the buffer). Modules that mix dtypes or hold integer buffers, or that tie tensors, are
    left as they are and get a plain dict back.
    """
    state = module.state_dict(keep_vars=True)
    tensors = {n: state[n].detach() for n in (order if order is not None else state)}
    if len(tensors) != len(state):
        raise ValueError(f"the order names {len(tensors)} tensors; the module has {len(state)}")
    try:
        if len({t.data_ptr() for t in tensors.values()}) != len(tensors):
            raise ValueError("tied tensors")
        flat = FlatTensors.pack(tensors)
    except ValueError:
        return tensors
    for name, tensor in state.items():
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = flat[name]
        else:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = flat[name]
    return flat


def check_compatible(target: Tensors, sources: Sequence[Tensors]) -> None:
    """Every source must hold every target tensor, with the same shape. Raises ValueError."""
    for i, source in enumerate(sources):
        shape_of = getattr(source, "shape", None)  # lazy sources tell shapes without reading data
        for name, tensor in target.items():
            if name not in source:
                raise ValueError(f"source #{i} has no tensor {name!r}")
            shape = tuple(shape_of(name) if callable(shape_of) else source[name].shape)
            if shape != tuple(tensor.shape):
                raise ValueError(f"source #{i}: tensor {name!r} has shape {shape}, target has {tuple(tensor.shape)}")


# Elements per block when summing on the CPU: small enough that the output block stays in cache
# while every source streams through it once (K reads + 1 write, the memory-bandwidth bound),
# large enough that the per-op overhead is a small share.
CPU_BLOCK = 1 << 18
GPU_BLOCK = 1 << 26
# From this many elements per mix on, `average_into` uses a compiled kernel that reads each source
# once and writes the target once. Smaller mixes stay eager: compiling takes ~10-40 s once per K
# on this CPU. Flat buffers go through a dynamic-shape kernel, one call per contiguous range (the
# whole buffer, or one range per block with block weights): 0.92-1.03x the bound for SD-1.5 and SDXL
# shapes, K = 4, where 2^20-element static chunks ran at 1.16-1.23x (bench/blocks_bench.py); plain
# state dicts through its twin, one call per tensor. See bench/RESULTS.md.
FUSED_MIN_ELEMENTS = 1 << 26
RANGE_MAX = 1 << 30  # elements per kernel call at most (a range longer than this, SDXL's whole buffer, is split)
WARM_UP_MIN = 1 << 24  # buffers from this size on compile their kernels in the background (SD-sized denoisers)


def _weighted_sum(out: torch.Tensor, sources: list[torch.Tensor], weights: torch.Tensor) -> None:
    acc = sources[0].to(weights.dtype) * weights[0]
    for i in range(1, len(sources)):
        acc = acc + sources[i].to(weights.dtype) * weights[i]
    out.copy_(acc)


def _weighted_sum_range(out: torch.Tensor, sources: list[torch.Tensor], weights: torch.Tensor) -> None:
    _weighted_sum(out, sources, weights)  # its own code object, so its compiled variants are cached apart


_kernels: dict[str, object] = {}
_broken: list[str] = []  # why compiling failed, once; then everything runs eager
_ready: set[tuple] = set()  # (kind, K, dtype, device type) variants compiled already
_warming: dict[tuple, object] = {}  # variant -> the thread compiling it
# Compiling traces with torch.fx, which patches torch.nn.Module.__call__ for the whole process while
# it runs: a model running in another thread meanwhile fails ("module is not installed as a
# submodule"). Compiles and model forward passes (the studio's renders) therefore hold this lock.
TRACING = __import__("threading").RLock()


def _kernel(kind: str):
    """The compiled kernel ("tensors": one call per tensor; "range": one call per range of a flat
    buffer; both with dynamic shapes), or None if compiling failed."""
    if _broken:
        return None
    if kind not in _kernels:
        import torch._dynamo

        # One compiled variant per K (and rank, dtype): dynamo's default limit of 8 would silently
        # send the ninth back to eager Python, at ~8x the bound.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        _kernels[kind] = torch.compile(_weighted_sum_range if kind == "range" else _weighted_sum, dynamic=True)
    return _kernels[kind]


def _variant(kind: str, k: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (kind, k, dtype, torch.device(device).type)


def compiled_ready(kind: str, k: int, dtype: torch.dtype, device) -> bool:
    """Whether the compiled kernel for K sources of this dtype is compiled (so calling it is cheap)."""
    return _variant(kind, k, dtype, device) in _ready


def _compile_range_variant(k: int, dtype: torch.dtype, device) -> None:
    variant = _variant("range", k, dtype, device)
    with TRACING:
        if variant in _ready or _broken:
            return
        out = torch.zeros(1 << 12, dtype=dtype, device=device)
        sources = [torch.zeros(1 << 12, dtype=dtype, device=device) for _ in range(k)]
        weights = torch.full((k,), 1.0 / k, dtype=_acc_dtype(out), device=out.device)
        if _run_compiled("range", iter([(out, sources, weights)])):
            _ready.add(variant)
            logger.info("soup kernel compiled for K=%d, %s on %s", k, str(dtype).removeprefix("torch."), variant[3])


BACKGROUND = True  # compile kernels in the background for later mixes (a server); the CLI, one mix and done, does not


def warm_up(ks, dtype: torch.dtype, device, background: bool = True) -> list:
    """Compile the flat-buffer (range) kernel for each K in `ks` ahead of use (10-40 s each on a CPU), so that
    no interactive mix pays for compiling; until a variant is ready, mixes of that K run eager.
    Returns the threads started (empty when `background` is False: compiled here and now; and when
    background compiles are off, `BACKGROUND`)."""
    threads = []
    for k in ks:
        variant = _variant("range", k, dtype, device)
        if variant in _ready or variant in _warming or _broken or (background and not BACKGROUND):
            continue
        if not background:
            _compile_range_variant(k, dtype, device)
            continue
        threads.append(start_compile(variant, _compile_range_variant, (k, dtype, device), f"soup-compile-K{k}"))
    return threads


def start_compile(key: tuple, target, args: tuple, name: str):
    """Run a background compile (this kernel's, or a merge method's: methods.warm) in a daemon thread
    that `compiling()` lists and the process waits for at exit (see `exit`)."""
    import atexit
    import threading

    if not _warming:
        atexit.register(_join_compiles)
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    _warming[key] = t
    t.start()
    return t


def compiling() -> list:
    """The background compiles still running."""
    return [t for t in _warming.values() if t.is_alive()]


def _join_compiles() -> None:
    # At interpreter exit, a compile still running in a daemon thread can abort the process while
    # it is torn down ("terminate called without an active exception", SIGABRT): wait for it.
    for t in compiling():
        t.join()


def exit(code: int) -> None:  # noqa: A001 (the process's exit, as sys.exit)
    """End the process with `code`, at once even when a background compile is running: streams
    flushed and logging shut down, then os._exit, so the compile is abandoned without the process
    teardown that can abort on it (what `python -m soup_ui` and `app.py` end with; every file they
    write is closed and renamed into place before)."""
    import os
    import sys

    if not compiling():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compile_failed(err: BaseException) -> bool:
    """Whether an error from a compiled kernel's call says that compiling failed (dynamo, inductor, no
    C++ compiler: run eager from then on) rather than that the call failed (out of memory, a bad
    input: raised as it is, and compiled kernels stay on for the process)."""
    import torch._dynamo.exc

    return isinstance(err, (torch._dynamo.exc.TorchDynamoException, OSError))  # torch.OutOfMemoryError is neither


def _run_compiled(kind: str, calls: Iterator[tuple]) -> bool:
    """Run kernel(out, sources, weights) for each call; False (having written nothing) if compiling fails.

    `calls` is consumed one at a time, so lazily read sources (lean mode) are resident one tensor each.
    """
    kernel = _kernel(kind)
    first = next(calls, None) if kernel is not None else None
    if first is None:
        return False
    try:  # compiles on the first call, before anything else is written
        with TRACING:
            kernel(*first)
    except Exception as err:  # no C++ compiler, unsupported device, ...
        if not compile_failed(err):
            raise
        logger.warning("fused soup kernel unavailable (%s: %s); using the eager path", type(err).__name__, err)
        _broken.append(f"{type(err).__name__}: {err}")
        return False
    out, sources, _ = first
    _ready.add(_variant(kind, len(sources), out.dtype, out.device))
    _traced.add(_signature(kind, out, sources))
    for call in calls:
        signature = _signature(kind, call[0], call[1])
        if signature in _traced:
            kernel(*call)
            continue
        with TRACING:  # a call of a new shape may recompile (lean mode's tensors, one by one): traced under the lock
            kernel(*call)
        _traced.add(signature)
    return True


_traced: set[tuple] = set()  # call shapes the compiled kernels have seen: calls of another may recompile


def _signature(kind: str, out: torch.Tensor, sources: list) -> tuple:
    """What makes dynamo compile a kernel anew with dynamic shapes: the sources' count, dtype and
    device, the rank, and which sizes are 0 or 1 (specialized)."""
    return (kind, len(sources), out.dtype, out.device.type, out.dim(), tuple(n < 2 for n in out.shape))


def _acc_dtype(out: torch.Tensor) -> torch.dtype:
    """What sums run in: float64 for float64 targets, else float32."""
    return torch.float64 if out.dtype == torch.float64 else torch.float32


def _weights_tensor(mix: list, out: torch.Tensor) -> torch.Tensor:
    return torch.tensor([w for _, w in mix], dtype=_acc_dtype(out), device=out.device)


def _sum_flat(out: torch.Tensor, parts: list, fused: bool | None) -> None:
    """Ranges of one flat buffer, each with its own sources and weights: (start, stop, [(buffer,
    weight)]), each one call of the compiled kernel (split every RANGE_MAX elements).

    fused=None: for SD-sized buffers (WARM_UP_MIN), the kernel only if it is compiled for this K
    already; otherwise eager now, and the kernel is compiled in the background for the next mix
    (never inside an interactive request). Smaller buffers run eager."""
    for start, stop, mix in parts:
        use = fused
        if use is None:
            use = out.numel() >= WARM_UP_MIN and compiled_ready("range", len(mix), out.dtype, out.device)
            if not use and out.numel() >= WARM_UP_MIN:
                warm_up([len(mix)], out.dtype, out.device)
        if use:
            weights = _weights_tensor(mix, out)
            pieces = [(a, min(stop, a + RANGE_MAX)) for a in range(start, stop, RANGE_MAX)]
            if _run_compiled("range", ((out[a:b], [s[a:b] for s, _ in mix], weights) for a, b in pieces)):
                continue
        _average_eager({"": out[start:stop]}, [({"": s[start:stop]}, w) for s, w in mix])


def _average_tensors(target: Tensors, mix: list) -> bool:
    """The compiled path over a plain state dict, one call per tensor."""
    weights: dict[tuple, torch.Tensor] = {}

    def calls():
        for name, out in target.items():
            if out.is_floating_point():
                key = (out.device, _acc_dtype(out))
                if key not in weights:
                    weights[key] = _weights_tensor(mix, out)
                yield out, [s[name] for s, _ in mix], weights[key]

    if not _run_compiled("tensors", calls()):
        return False
    for name, out in target.items():
        if not out.is_floating_point():
            out.copy_(mix[0][0][name])
    return True


def _average_eager(target: Tensors, mix: list) -> None:
    scratch: dict[tuple, torch.Tensor] = {}
    for name, out in target.items():
        if not out.is_floating_point():  # integer buffers (e.g. counters): take the first source's
            out.copy_(mix[0][0][name])
            continue
        block = GPU_BLOCK if out.device.type == "cuda" else CPU_BLOCK
        acc_dtype = _acc_dtype(out)
        flat_out = out.view(-1) if out.is_contiguous() else None
        parts = [(s[name].reshape(-1), w) for s, w in mix]
        n = out.numel()
        if flat_out is None:  # rare: a non-contiguous target; sum whole, then copy
            acc = torch.zeros(n, dtype=acc_dtype, device=out.device)
            for src, w in parts:
                acc.add_(src, alpha=w)
            out.copy_(acc.view(out.shape))
            continue
        key = (out.device, acc_dtype)
        if acc_dtype != out.dtype and key not in scratch:
            scratch[key] = torch.empty(block, dtype=acc_dtype, device=out.device)
        for start in range(0, n, block):
            stop = min(n, start + block)
            dst = flat_out[start:stop]
            acc = dst if acc_dtype == out.dtype else scratch[key][: stop - start]
            (first, w0), rest = parts[0], parts[1:]
            acc.copy_(first[start:stop])
            if w0 != 1.0:
                acc.mul_(w0)
            for src, w in rest:
                acc.add_(src[start:stop], alpha=w)
            if acc is not dst:
                dst.copy_(acc)


@torch.no_grad()
def average_into(target: Tensors, sources: Sequence[Tensors], weights: Sequence[float], fused: bool | None = None) -> None:
    """Write the weighted average of `sources` into `target`'s tensors, in place (the paper's soup).

    `target` and each source map tensor names to tensors (a state dict, dict(module.named_parameters()),
    or FlatTensors: when target and sources are FlatTensors of one layout, the soup is one pass
    over their buffers). Weights are normalized to sum to 1; a source with weight 0 is not read.
    Everything is checked before the first write, so a bad call changes nothing. Sums run in
    float32 (or float64 for float64 targets), so low-precision targets are rounded once and
    weights (1, 0, ...) reproduce the first source bit for bit. Sources must not share memory
    with `target`. `fused`: use the compiled kernel (True), never (False), or (None) where it pays:
    large mixes, and for flat buffers only once the kernel for this K is compiled (see `warm_up`).
    """
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    weighted_sum_into(target, sources, normalize_weights(weights), fused)


@torch.no_grad()
def weighted_sum_into(target: Tensors, sources: Sequence[Tensors], coefficients: Sequence[float], fused: bool | None = None) -> None:
    """target = sum_i c_i * source_i, in place, for any finite coefficients (negative ones too), summed
    in float32 and rounded once. `average_into` is this with normalized weights; every linear merge
    method (methods/linear.py: task arithmetic, add-difference) is this with the base as one more source."""
    if len(sources) != len(coefficients):
        raise ValueError(f"{len(sources)} sources but {len(coefficients)} coefficients")
    weighted_sum_parts(target, sources, [(list(target), coefficients)], fused)


def part_ranges(target: FlatTensors, parts: Sequence[tuple[Sequence[str], Sequence[float]]]) -> list[tuple[int, int]] | None:
    """Where each part's tensors lie in a flat buffer, (start, stop), or None when some part's
    tensors are not one contiguous range."""
    out = []
    for names, _ in parts:
        spans = sorted((target.layout[n][0], target.layout[n][0] + math.prod(target.layout[n][1])) for n in names)
        if not spans or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            return None
        out.append((spans[0][0], spans[-1][1]))
    return out


@torch.no_grad()
def weighted_sum_parts(target: Tensors, sources: Sequence[Tensors], parts: Sequence[tuple[Sequence[str], Sequence[float]]],
                       fused: bool | None = None) -> None:
    """Per part (tensor names, one coefficient per source): target[names] = sum_i c_i * source_i[names],
    as `weighted_sum_into` (a block-weighted soup: one part per block). Over flat buffers whose parts
    are contiguous ranges (a layout ordered by block) each part is one range of the one pass. A
    source whose coefficients are all zero is not read. Everything is checked before the first write."""
    for names, coefficients in parts:
        if len(sources) != len(coefficients):
            raise ValueError(f"{len(sources)} sources but {len(coefficients)} coefficients")
        if not all(math.isfinite(c) for c in coefficients):
            raise ValueError(f"coefficients must be finite, got {list(coefficients)}")
        if not any(coefficients):
            raise ValueError("every coefficient is zero: nothing to sum")
    used = [s for i, s in enumerate(sources) if any(c[i] for _, c in parts)]
    flat = isinstance(target, FlatTensors) and all(target.same_layout(s) for s in used)
    ranges = part_ranges(target, parts) if flat else None
    if flat:
        if any(s.buffer.data_ptr() == target.buffer.data_ptr() for s in used):
            raise ValueError("a source shares memory with the target")
    else:
        check_compatible(target, used)
    if ranges is not None:
        _sum_flat(target.buffer, [(a, b, [(s.buffer, float(c)) for s, c in zip(sources, cs) if c]) for (a, b), (_, cs) in zip(ranges, parts)], fused)
        return
    for names, coefficients in parts:
        mix = [(s, float(c)) for s, c in zip(sources, coefficients) if c != 0]
        part = {n: target[n] for n in names}
        read_order = getattr(mix[0][0], "read_order", None)  # lazy sources: walk their files front to back
        if callable(read_order):
            rank = {n: i for i, n in enumerate(read_order())}
            part = dict(sorted(part.items(), key=lambda item: rank.get(item[0], len(rank))))
        use = fused
        if use is None:
            use = sum(t.numel() for t in part.values()) * len(mix) >= FUSED_MIN_ELEMENTS
        if not (use and _average_tensors(part, mix)):
            _average_eager(part, mix)


@torch.no_grad()
def weight_distance(sources: Sequence[Tensors], coefficients: Sequence[float] | Callable[[str], Sequence[float]]) -> float:
    """Root-mean-square over all parameters of sum_i c_i theta_i, without materializing it.

    With c = w_full - w_other this is the distance between two soups of the same shards.
    `coefficients` may depend on the tensor (a callable of its name: block weights).
    """
    total, count = 0.0, 0
    for name in sources[0]:
        first = sources[0][name]
        if not first.is_floating_point():
            continue
        cs = coefficients(name) if callable(coefficients) else coefficients
        pairs = [(s, c) for s, c in zip(sources, cs) if c != 0]
        count += first.numel()
        if not pairs:
            continue
        acc = pairs[0][0][name].to(torch.float32) * pairs[0][1]  # float32: Apple's MPS has no float64
        for source, c in pairs[1:]:
            acc.add_(source[name].to(torch.float32), alpha=c)
        total += float(acc.square().sum())
    return math.sqrt(total / max(count, 1))


def rounded_shares(shares: Sequence[float], digits: int = 2) -> list[float]:
    """Round shares that sum to 1 so that the rounded ones still do (largest remainder), e.g.
    (0.375, 0.625) -> (0.38, 0.62) rather than (0.38, 0.63), and 1/3 x 3 -> 0.34 + 0.33 + 0.33."""
    unit = 10**digits
    scaled = [w * unit for w in shares]
    floors = [math.floor(x) for x in scaled]
    missing = round(sum(scaled)) - sum(floors)
    order = sorted(range(len(shares)), key=lambda i: (floors[i] - scaled[i], i))
    for i in order[: max(0, missing)]:
        floors[i] += 1
    return [f / unit for f in floors]
