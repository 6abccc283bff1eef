"""Compiling the non-linear methods' kernels ahead of use, as `soup.warm_up` does for the soup kernel.

A server compiles TIES, DARE, DARE-TIES and DELLA (at their default choices) for the shard count it
starts with, in a background thread; until a method's kernels for that count (and its choices: rng,
ranks) are ready, its merges run eager, and a merge of a count or choice not compiled yet starts
its compile in the background for the next merge. No merge ever waits for the compiler (the first
TIES of a process took 10-22 s on a CPU). One-off commands (the CLI, exports) compile on first use.
"""

from __future__ import annotations

import logging
import threading
import typing

import torch

from . import kernels
from .merge import merge_into
from .registry import METHODS, MergeMethod, Params

logger = logging.getLogger(__name__)

COMPILED = ("ties", "dare", "dare-ties", "della")  # the methods with compiled kernels, in the order a server compiles them
_ready: set[tuple] = set()
_warming: dict[tuple, threading.Thread] = {}
_given_up: set[tuple] = set()  # compiles that failed: not tried again (their merges stay eager)
_lock = threading.Lock()


def variant(method_: MergeMethod, params: Params, k: int, dtype: torch.dtype, device) -> tuple:
    """What a method's compiled kernels depend on: the shard count, dtype, device and its choices (the
    parameters that pick another kernel, e.g. DARE's rng); the numbers (density, ...) are inputs."""
    choices = tuple((n, getattr(params, n)) for n, f in type(params).model_fields.items() if typing.get_origin(f.annotation) is typing.Literal)
    return method_.name, k, str(dtype), str(torch.device(device)), choices


def compiles(method_: MergeMethod) -> bool:
    """Whether the method runs compiled kernels at all (the sparse methods; linear ones use the soup
    kernel, SLERP and Model Stock run eager)."""
    return not method_.linear and method_.name in COMPILED


def ready(method_: MergeMethod, params: Params, k: int, dtype: torch.dtype, device) -> bool:
    return not compiles(method_) or variant(method_, params, k, dtype, device) in _ready


def compiling(name: str | None = None) -> list[tuple]:
    """The variants (of method `name`, or all) still compiling in the background."""
    with _lock:
        return [v for v, t in _warming.items() if t.is_alive() and (name is None or v[0] == name)]


def warm_up(method_: MergeMethod, params: Params, k: int, dtype: torch.dtype, device) -> threading.Thread | None:
    """Compile the method's kernels for k shards in a background thread, unless they are ready or
    compiling (or compiling is off: `soup.BACKGROUND`, or it failed before). Returns the thread started."""
    from .. import soup

    v = variant(method_, params, k, dtype, device)
    if not compiles(method_) or not soup.BACKGROUND or kernels._failed or not method_.min_shards <= k <= (method_.max_shards or k):
        return None
    with _lock:
        if v in _ready or v in _warming or v in _given_up:
            return None
        _warming[v] = soup.start_compile(("method", *v), _compile, (method_, params, k, dtype, device, v), f"{method_.name}-compile-K{k}")
        return _warming[v]


def join(timeout: float | None = None) -> None:
    """Wait for the background compiles started so far."""
    with _lock:
        threads = list(_warming.values())
    for t in threads:
        t.join(timeout)


def warm_up_all(k: int, dtype: torch.dtype, device) -> list[threading.Thread]:
    """Every compiling method at its defaults, for k shards: what a server starts with."""
    threads = [warm_up(METHODS[name], METHODS[name].params(), k, dtype, device) for name in COMPILED]
    return [t for t in threads if t is not None]


def _compile(method_: MergeMethod, params: Params, k: int, dtype: torch.dtype, device, v: tuple) -> None:
    """Merge a model of one large tensor and a batch of small ones (each path the method compiles),
    random values, with the method's kernels compiled on this first use."""
    from .. import soup

    try:
        g = torch.Generator().manual_seed(0)
        big = max(kernels.FUSED_MIN_ELEMENTS, 64) // 64 + 1
        shapes = {"big.weight": (64, big), **{f"small.{i}.weight": (kernels.FUSED_MIN_ELEMENTS // 4 + 1,) for i in range(4)}}

        def model() -> soup.FlatTensors:  # laid out as the studio keeps models: views of one flat buffer
            return soup.FlatTensors.pack({n: torch.randn(s, generator=g).to(dtype=dtype, device=device) for n, s in shapes.items()})

        base, sources, target = model(), [model() for _ in range(k)], model()
        # with a memo, as the studio merges: per-shard statistics (TIES' thresholds) computed a shard at a time
        merge_into(target, method_, params, sources, [1.0 / k] * k, base, memo={}, keys=list(range(k)))
        if kernels._failed:
            _given_up.add(v)
        else:
            _ready.add(v)
            logger.info("%s kernels compiled for K=%d, %s on %s", method_.name, k, v[2].removeprefix("torch."), v[3])
    except Exception as err:  # noqa: BLE001 (a background compile never takes the server down; the merges stay eager)
        _given_up.add(v)
        logger.warning("compiling %s's kernels for K=%d failed (%s: %s); its merges run eager", method_.name, k, type(err).__name__, err)
    finally:
        with _lock:
            _warming.pop(v, None)
