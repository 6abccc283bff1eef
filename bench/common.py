"""Shared helpers for the benchmark scripts: timing medians and describing the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import psutil
import torch


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs, after `warmup` untimed runs."""
    return interleaved_medians([fn], repeats, warmup)[0]


def interleaved_medians(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each of `fns`, timed in rounds (fn 1, fn 2, ..., fn 1, fn 2, ...).

    On a shared machine the memory bandwidth drifts by 10-20% over minutes; interleaving lets a
    ratio between two of these compare runs made under the same conditions.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            bucket.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def available_bytes() -> int:
    return psutil.virtual_memory().available
