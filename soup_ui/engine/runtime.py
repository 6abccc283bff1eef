"""Runtime options: where and how models run, kept apart from presets and recipes (as mergekit keeps
`MergeOptions` apart from its merge configuration). Declared once for `app.py` and the CLI, as an
argparse parent parser. No torch here: `python app.py --help` answers at once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DTYPES = ["float16", "bfloat16", "float32"]
MEMORY_TIERS = ["resident", "pinned", "lean"]


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how models run; kept apart from presets and recipes."""

    device: str | None = None  # None: cuda if available, else mps, else cpu
    dtype: str | None = None  # None: float16 on GPU, float32 on CPU (fp16 maths is slow on CPUs)
    cache_size: int = 512  # rendered images kept in memory
    lean: bool | None = None  # stream shards from memory-mapped files; None: when they would not fit
    memory: str | None = None  # force where shards live: "resident", "pinned" or "lean" (None: planned, see Pool.plan)
    exporting: bool = False  # the path writes the soup (CLI export): the memory plan counts its CPU copy of the merged weights
    warm_up: bool = True  # compile the soup kernel in the background at start (off where this Studio never merges: a page with render workers)

    @classmethod
    def of(cls, args: argparse.Namespace, **more) -> RuntimeOptions:
        """The options `parser()` read."""
        return cls(device=args.device, dtype=args.dtype, lean=True if args.lean else None, memory=args.memory, **more)


def parser() -> argparse.ArgumentParser:
    """The runtime flags, as a parent parser: --device, --dtype, --lean, --memory."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: float16 on GPU, float32 on CPU); for a streamed export (unet), "
                   "the file's dtype (default: the base's)")
    p.add_argument("--lean", action="store_true", help="stream shards from their files instead of loading each (default: when they would not fit)")
    p.add_argument("--memory", choices=MEMORY_TIERS, help="where every shard lives: on the device, in pinned CPU memory (copied to the GPU "
                   "per soup) or in its files (default: planned from free memory, said in the page header)")
    return p
