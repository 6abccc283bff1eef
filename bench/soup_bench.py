"""Soup throughput on Stable-Diffusion-2.1-shaped UNets, against the memory-bandwidth bound.

    python bench/soup_bench.py [--k 2,4,6] [--dtypes float16,float32] [--repeats 5]

For each dtype and K it builds K random state dicts with SD 2.1's UNet shapes (865.9M parameters)
and times, in the same run:
- the bandwidth reference: torch.add(a, b, out=c) over two shards' tensors gives the machine's
  bytes/s for streaming ops; a soup of K shards must read K shards and write one, so its bound is
  (K + 1) x shard bytes / that rate;
- `soup_ui.soup.average_into` into a preallocated target;
- a naive per-key loop that builds a new state dict (what A1111-style mergers do).
Prints medians and ratios; with --results, appends them to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import available_bytes, machine, median_seconds  # noqa: E402

from soup_ui.soup import average_into  # noqa: E402

SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)


def sd21_shapes() -> dict[str, torch.Size]:
    """Tensor names and shapes of SD 2.1's UNet, built on the meta device (no memory, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    return {k: v.shape for k, v in unet.state_dict().items()}


def random_shard(shapes, dtype, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.empty(s, dtype=torch.float32).normal_(generator=g).to(dtype) for k, s in shapes.items()}


def naive_merge(sources, weights):
    """The usual merger loop: per key, a new tensor from Python-level arithmetic."""
    merged = {}
    for key in sources[0]:
        value = sources[0][key] * weights[0]
        for source, w in zip(sources[1:], weights[1:]):
            value = value + source[key] * w
        merged[key] = value
    return merged


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only), so reads come from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def lean_bench(shapes, k: int, folder: Path) -> list[str]:
    """Soup K shards streamed tensor by tensor from safetensors files, against reading the files."""
    from safetensors.torch import save_file

    from soup_ui.checkpoints import LazyWeights

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(k):
        file = folder / f"shard{i}.safetensors"
        if not file.is_file():
            save_file(random_shard(shapes, torch.float16, 100 + i), str(file))
        files.append(file)
    total = sum(f.stat().st_size for f in files)
    target = {n: torch.empty(s, dtype=torch.float16) for n, s in shapes.items()}

    def read_files():
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

    def stream_soup():
        average_into(target, [LazyWeights(f) for f in files], [1.0] * k)

    out = [f"Lean mode: K={k} fp16 SD-2.1-shaped shards on disk ({total / 2**30:.1f} GiB), the soup streamed tensor by tensor", ""]
    out += ["| cache | read the files (s) | streamed soup (s) | soup / read |", "|---|---|---|---|"]
    for label, cold in (("cold (page cache dropped)", True), ("warm (files in page cache)", False)):
        if cold and not drop_page_cache():
            out.append("| cold | cannot drop the page cache here (needs root) | | |")
            continue
        t0 = time.perf_counter()
        read_files()
        read = time.perf_counter() - t0
        if cold:
            drop_page_cache()
        t0 = time.perf_counter()
        stream_soup()
        soup = time.perf_counter() - t0
        out.append(f"| {label} | {read:.2f} ({total / read / 2**30:.2f} GiB/s) | {soup:.2f} | {soup / read:.2f}x |")
    print("\n".join(out), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="2,4,6")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--lean-k", type=int, default=0, help="also stream K fp16 shards from disk (lean mode)")
    parser.add_argument("--lean-dir", type=Path, default=Path("/tmp/soup-bench-shards"), help="where the lean benchmark writes its shards")
    args = parser.parse_args(argv)
    shapes = sd21_shapes()
    params = sum(s.numel() for s in shapes.values())
    lines = [f"Machine: {machine()}", f"SD-2.1-shaped UNet: {params / 1e6:.1f}M parameters, {len(shapes)} tensors; medians of {args.repeats} runs", ""]
    lines += ["| dtype | K | bound (s) | average_into (s) | / bound | naive loop (s) | naive / ours |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        shard_bytes = params * torch.finfo(dtype).bits // 8
        for k in [int(x) for x in args.k.split(",")]:
            need = (k + 2) * shard_bytes * 1.1  # K shards, the target, the naive loop's new dict
            if need > available_bytes():
                line = f"| {dtype_name} | {k} | skipped: needs {need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB free |"
                print(line, flush=True)
                lines.append(line)
                continue
            sources = [random_shard(shapes, dtype, seed) for seed in range(k)]
            target = {n: torch.empty_like(t) for n, t in sources[0].items()}
            weights = [1.0 / k] * k

            def reference():
                for n, t in target.items():
                    torch.add(sources[0][n], sources[1][n], out=t)

            ref = median_seconds(reference, args.repeats)
            rate = 3 * shard_bytes / ref  # bytes/s of a two-read one-write stream
            bound = (k + 1) * shard_bytes / rate
            ours = median_seconds(lambda: average_into(target, sources, weights), args.repeats)
            naive = median_seconds(lambda: naive_merge(sources, weights), max(3, args.repeats // 2))
            line = f"| {dtype_name} | {k} | {bound:.3f} | {ours:.3f} | {ours / bound:.2f}x | {naive:.3f} | {naive / ours:.1f}x |"
            print(line, flush=True)
            lines.append(line)
            del sources, target
    print(f"\nBandwidth reference: torch.add(out=) over two shards; bound = (K+1) x shard bytes at that rate.")
    if args.lean_k:
        lines += ["", *lean_bench(shapes, args.lean_k, args.lean_dir)]
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
