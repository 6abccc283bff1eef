"""Block-weighted soups against the plain average and the memory-bandwidth bound (issue 20).

    python bench/blocks_bench.py [--unets sd15,sdxl] [--k 4] [--dtype float16] [--repeats 5]

For each UNet shape (built on the meta device) it lays K shards and the target out block by block,
as the studio does (`families.Blocks.order`), and times, interleaved in one run:
- the bound: the machine's streaming rate (torch.add over two shards, a copy of one), times the
  (K + 1) x shard bytes a soup reads and writes;
- the plain average (`soup.weighted_sum_parts` with one part: what a mix without block weights runs);
- the block-weighted soup: every shard with its own random multiplier per block, normalized per
  block: one part per block (26 for SD 1.5, 20 for SDXL), each range one call of the compiled kernel.
Both kernels are compiled before timing, as the studio does at load. To fit K = 4 SDXL shards in
24 GB, the shards are views into one buffer, each starting ~200 MB after the one before: every
read is of distinct memory at any moment (far beyond the caches), as with separate shards.
Prints medians and ratios; with --results, appends them to a markdown file.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import interleaved_medians, machine  # noqa: E402
from soup_bench import SD15_UNET, SDXL_UNET, random_shard  # noqa: E402

from soup_ui.modelfiles import families
from soup_ui.maths import soup  # noqa: E402

SHAPES = {"sd15": ("SD-1.5", "sd1", SD15_UNET), "sdxl": ("SDXL", "sdxl", SDXL_UNET)}
STAGGER = 100_000_000 - 100_000_000 % 4096  # elements between two shards' starts in the shared buffer (~200 MB in fp16): not a
# power of two, so that the K streams do not fall into the same cache sets (a 2^27 stride ran 2x slower)


def layout(config: dict, family: str) -> tuple[dict[str, torch.Size], families.Blocks]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    config = dict(unet.config)
    blocks = families.block_map(family, config, state)
    return {n: state[n].shape for n in blocks.order(state)}, blocks


def staggered(shapes, dtype, k: int) -> list[soup.FlatTensors]:
    """K shards of random weights, views into one buffer, STAGGER elements apart."""
    template = soup.FlatTensors.empty(shapes, dtype, "meta")
    n = template.buffer.numel()
    buffer = torch.empty(n + (k - 1) * STAGGER, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for chunk in buffer.split(1 << 24):
        chunk.copy_(torch.empty(chunk.shape, dtype=torch.float32).normal_(generator=g))
    return [soup.FlatTensors(buffer[i * STAGGER : i * STAGGER + n], template.layout) for i in range(k)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unets", default="sd15,sdxl")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--separate", action="store_true", help="separate buffers per shard (needs K + 1 full shards of memory)")
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    dtype, k = getattr(torch, args.dtype), args.k
    lines = [f"Machine: {machine()}", f"Block-weighted soups, K = {k}, {args.dtype}, medians of {args.repeats} (interleaved)", "",
             "| UNet | parameters | blocks | bound (s) | plain average (s) | / bound | block-weighted (s) | / bound | / plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    soup.warm_up([k], dtype, "cpu", background=False)
    for key in args.unets.split(","):
        label, family, config = SHAPES[key]
        shapes, blocks = layout(config, family)
        sources = [random_shard(shapes, dtype, seed) for seed in range(k)] if args.separate else staggered(shapes, dtype, k)
        target = soup.FlatTensors.empty(shapes, dtype)
        members = blocks.members()
        rng = random.Random(0)
        weights = [1.0 / k] * k
        plain = [(list(shapes), weights)]
        parts = []
        for block in blocks.ids:
            scaled = [w * rng.uniform(0.1, 1.0) for w in weights]
            parts.append((members[block], [x / sum(scaled) for x in scaled]))
        assert soup.part_ranges(target, parts) is not None  # one contiguous range per block
        shard_bytes = sources[0].buffer.numel() * sources[0].buffer.element_size()
        add, copy, flat, blocked = interleaved_medians([
            lambda: torch.add(sources[0].buffer, sources[1].buffer, out=target.buffer),
            lambda: target.buffer.copy_(sources[0].buffer),
            lambda: soup.weighted_sum_parts(target, sources, plain),
            lambda: soup.weighted_sum_parts(target, sources, parts),
        ], args.repeats)
        bound = (k + 1) * shard_bytes / max(3 * shard_bytes / add, 2 * shard_bytes / copy)
        params = sum(s.numel() for s in shapes.values())
        line = (f"| {label} | {params / 1e6:.0f}M | {len(blocks)} | {bound:.3f} | {flat:.3f} | {flat / bound:.2f}x | {blocked:.3f} | "
                f"{blocked / bound:.2f}x | {blocked / flat:.2f}x |")
        print(line, flush=True)
        lines.append(line)
        del sources, target
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
