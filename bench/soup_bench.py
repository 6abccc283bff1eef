"""Soup throughput on Stable-Diffusion-2.1-shaped UNets, against the memory-bandwidth bound.

    python bench/soup_bench.py [--k 2,4,6] [--dtypes float16,float32] [--repeats 5] [--lean-k 4]

For each dtype and K it builds K shards of random weights with SD 2.1's UNet shapes (865.9M
parameters, each shard one flat buffer whose views are its 686 tensors) and times, in one run:
- the bound: torch.add(a, b, out=c) over two whole shards gives the machine's streaming rate;
  a soup of K shards reads K and writes one, so its bound is (K + 1) x shard bytes at that rate;
- `soup_ui.maths.soup.average_into` on the flat buffers (what the studio holds) and on the 686 tensors
  (the generic API on a plain state dict), interleaved with the bound;
- a naive per-key loop that builds a new state dict (what A1111-style mergers do);
- sd-mecha's n_average on the same state dicts, if installed (pip install --no-deps sd-mecha==1.1.8 scipy fuzzywuzzy).
With --lean-k, it also streams K fp16 shards from safetensors files (lean mode) against reading them;
`--unet flux --lean-only --flux-blocks D,S` does that alone for FLUX.1-shaped bf16 transformers
(FLUX's widths, D double and S single blocks: the full 23.8 GB per shard rarely fits a disk K times).
Prints medians and ratios; with --results, appends them to a markdown file.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import available_bytes, interleaved_medians, machine, median_seconds  # noqa: E402

from soup_ui.maths.soup import FlatTensors, average_into  # noqa: E402

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


SD15_UNET = dict(SD21_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
SDXL_UNET = dict(  # stable-diffusion-xl-base-1.0's unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# FLUX.1-dev's transformer/config.json (19 double + 38 single blocks, 3072 wide: 11.9B parameters,
# 23.8 GB per shard in bf16). --flux-blocks keeps its widths with fewer blocks when the disk is short.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
UNETS = {"sd15": ("SD-1.5", SD15_UNET), "sd21": ("SD-2.1", SD21_UNET), "sdxl": ("SDXL", SDXL_UNET), "flux": ("FLUX.1-dev", FLUX_TRANSFORMER)}


def unet_shapes(config: dict) -> dict[str, torch.Size]:
    """Tensor names and shapes of a UNet (or, for FLUX's config, a FluxTransformer2DModel), built on
    the meta device (no memory, no download)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if "num_single_layers" in config else UNet2DConditionModel
    with torch.device("meta"):
        unet = cls(**config)
    return {k: v.shape for k, v in unet.state_dict().items()}


def sd21_shapes() -> dict[str, torch.Size]:
    return unet_shapes(SD21_UNET)


def random_shard(shapes, dtype, seed, device="cpu") -> FlatTensors:
    """One shard of random weights, packed in one flat buffer (its tensors are views of it)."""
    shard = FlatTensors.empty(shapes, dtype, device)
    g = torch.Generator(device).manual_seed(seed)
    for chunk in shard.buffer.split(1 << 24):  # fill in fp32 chunks: no full-size temporary
        chunk.copy_(torch.empty(chunk.shape, dtype=torch.float32, device=device).normal_(generator=g))
    return shard


def naive_merge(sources, weights):
    """The usual merger loop: per key, a new tensor from Python-level arithmetic."""
    merged = {}
    for key in sources[0]:
        value = sources[0][key] * weights[0]
        for source, w in zip(sources[1:], weights[1:]):
            value = value + source[key] * w
        merged[key] = value
    return merged


def mecha_merge(sources, dtype):
    """sd-mecha's n_average over the same in-memory state dicts (fp32 maths, its default checks on).

    sd-mecha knows SD 1/XL/3 and Flux key layouts but not SD 2.1's diffusers UNet: left to infer,
    it picks its SDXL UNet config and drops the 268 keys SDXL lacks. So the exact keys are
    registered as a config of their own, and every tensor is merged.
    """
    import sd_mecha
    from sd_mecha.extensions import model_configs

    name = "sd21bench-diffusers_unet_only"
    try:
        model_configs.resolve(name)
    except (KeyError, ValueError):  # not registered yet
        keys = {k: model_configs.KeyMetadata(list(t.shape), t.dtype) for k, t in sources[0].items()}
        model_configs.register(model_configs.ModelConfigImpl(name, {"unet": model_configs.ModelComponent(keys)}))
    recipe = sd_mecha.n_average(*(sd_mecha.model(dict(s), config=name) for s in sources))
    return sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=dtype, tqdm=Quiet)


class Quiet:
    """A silent stand-in for tqdm (sd-mecha's `tqdm` argument), so no progress bar is timed."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


def mecha_version() -> str | None:
    try:
        from importlib.metadata import version

        import sd_mecha  # noqa: F401

        return version("sd-mecha")
    except Exception:  # not installed, or it fails to import
        return None


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only), so reads come from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def lean_bench(shapes, k: int, folder: Path, rounds: int = 3, label: str = "SD-2.1", dtype: torch.dtype = torch.float16) -> list[str]:
    """Soup K shards streamed tensor by tensor from safetensors files, against reading the files."""
    from safetensors.torch import save_file

    from soup_ui.modelfiles.checkpoints import LazyWeights

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(k):
        file = folder / f"shard{i}.safetensors"
        if not file.is_file():
            save_file({n: t.clone() for n, t in random_shard(shapes, dtype, 100 + i).items()}, str(file))
        files.append(file)
    total = sum(f.stat().st_size for f in files)
    target = {n: torch.empty(s, dtype=dtype) for n, s in shapes.items()}

    def read_files():
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

    def stream_soup():
        average_into(target, [LazyWeights(f) for f in files], [1.0] * k)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    name = str(dtype).removeprefix("torch.")
    out = [f"Lean mode: K={k} {name} {label}-shaped shards on disk ({total / 2**30:.1f} GiB), the soup streamed tensor by tensor", ""]
    out += ["| cache | read the files (s) | streamed soup (s) | soup / read |", "|---|---|---|---|"]
    if not drop_page_cache():
        out.append("| cold | cannot drop the page cache here (needs root) | | |")
    else:  # rounds of (cold read, cold soup), medians: the disk's speed drifts between runs
        reads, soups = [], []
        for _ in range(rounds):
            drop_page_cache()
            reads.append(timed(read_files))
            drop_page_cache()
            soups.append(timed(stream_soup))
        read, soup = statistics.median(reads), statistics.median(soups)
        out.append(f"| cold (page cache dropped), median of {rounds} | {read:.2f} ({total / read / 2**30:.2f} GiB/s) | {soup:.2f} | {soup / read:.2f}x |")
    read, soup = interleaved_medians([read_files, stream_soup], rounds)
    out.append(f"| warm (files in page cache), median of {rounds} | {read:.2f} ({total / read / 2**30:.2f} GiB/s) | {soup:.2f} | {soup / read:.2f}x |")
    print("\n".join(out), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="2,4,6")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the shards live (cpu or cuda)")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True, help="compile the soup kernel for each K before timing")
    parser.add_argument("--unet", choices=sorted(UNETS), default="sd21", help="whose UNet shapes (SD 2.1: 865.9M parameters; SDXL: 2.57B)")
    parser.add_argument("--mecha", action=argparse.BooleanOptionalAction, default=True, help="also time sd-mecha if installed")
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--lean-k", type=int, default=0, help="also stream K fp16 shards from disk (lean mode)")
    parser.add_argument("--lean-dir", type=Path, default=Path("/tmp/soup-bench-shards"), help="where the lean benchmark writes its shards")
    parser.add_argument("--lean-only", action="store_true", help="only the lean benchmark (e.g. FLUX shards, which do not fit in memory)")
    parser.add_argument("--flux-blocks", default="", help="double,single blocks of the FLUX-shaped transformer (default: FLUX.1's 19,38)")
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True, help="also time the naive per-key loop (needs one more shard of memory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # sd-mecha warns that in-memory recipes are not serialized
    label, config = UNETS[args.unet]
    if args.unet == "flux" and args.flux_blocks:
        double, single = (int(x) for x in args.flux_blocks.split(","))
        config = dict(config, num_layers=double, num_single_layers=single)
        label += f" widths, {double} double + {single} single blocks (of 19 + 38)"
    shapes = unet_shapes(config)
    if args.lean_only:
        params = sum(s.numel() for s in shapes.values())
        dtype = torch.bfloat16 if args.unet == "flux" else torch.float16
        head = [f"Machine: {machine()}", f"{label}: {params / 1e6:.1f}M parameters, {len(shapes)} tensors", ""]
        print("\n".join(head), flush=True)
        lines = head + lean_bench(shapes, args.lean_k or 2, args.lean_dir, label=label, dtype=dtype)
        if args.results:
            with open(args.results, "a") as f:
                f.write("\n".join(lines) + "\n")
        return
    params = sum(s.numel() for s in shapes.values())
    where = f"{torch.cuda.get_device_name()} ({args.device})" if args.device.startswith("cuda") else args.device
    lines = [f"Machine: {machine()}; shards on {where}", f"{label}-shaped UNet: {params / 1e6:.1f}M parameters, {len(shapes)} tensors; medians of {args.repeats} runs", ""]
    mecha = mecha_version() if args.mecha else None
    lines += [
        f"| dtype | K | bound (s) | average_into, flat buffers (s) | / bound | average_into, {len(shapes)} tensors (s) | / bound "
        "| naive loop (s) | naive / flat | sd-mecha (s) | sd-mecha / flat |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        shard_bytes = params * torch.finfo(dtype).bits // 8
        for k in [int(x) for x in args.k.split(",") if x]:
            need = (k + 1 + args.naive) * shard_bytes * 1.05  # K shards, the target, the naive loop's new dict
            free = torch.cuda.mem_get_info()[0] if args.device.startswith("cuda") else available_bytes()
            if need > free:
                line = f"| {dtype_name} | {k} | skipped: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free |"
                print(line, flush=True)
                lines.append(line)
                continue
            if args.warm_up:  # compile the flat kernel for this K first, as the studio does at load
                from soup_ui.maths.soup import warm_up

                warm_up([k], dtype, torch.device(args.device), background=False)
            sources = [random_shard(shapes, dtype, seed, args.device) for seed in range(k)]
            target = FlatTensors.empty(shapes, dtype, args.device)
            per_tensor_target, per_tensor_sources = dict(target), [dict(s) for s in sources]  # the same memory, as views
            weights = [1.0 / k] * k
            # The machine's streaming rate: the faster of torch.add over two whole shards (two reads,
            # one write) and a copy of one (one read, one write). Interleaved with the soups, so
            # bandwidth drift on a shared machine hits them alike.
            add, copy, flat, tensors = interleaved_medians(
                [
                    lambda: torch.add(sources[0].buffer, sources[1].buffer, out=target.buffer),
                    lambda: target.buffer.copy_(sources[0].buffer),
                    lambda: average_into(target, sources, weights),
                    lambda: average_into(per_tensor_target, per_tensor_sources, weights),
                ],
                args.repeats,
            )
            rate = max(3 * shard_bytes / add, 2 * shard_bytes / copy)
            bound = (k + 1) * shard_bytes / rate
            cells = [f"{bound:.3f}", f"{flat:.3f}", f"{flat / bound:.2f}x", f"{tensors:.3f}", f"{tensors / bound:.2f}x"]
            if args.naive:
                naive = median_seconds(lambda: naive_merge(per_tensor_sources, weights), max(3, args.repeats // 2))
                cells += [f"{naive:.3f}", f"{naive / flat:.1f}x"]
            else:
                cells += ["not run (--no-naive)", ""]
            if mecha:
                mech = median_seconds(lambda: mecha_merge(per_tensor_sources, dtype), 3)
                merged = mecha_merge(per_tensor_sources, dtype)
                worst = max((merged[n].float() - target[n].float()).abs().max().item() for n in shapes)
                if set(merged) != set(shapes) or worst > 1e-2:
                    raise RuntimeError(f"sd-mecha's soup differs from ours: {len(merged)} of {len(shapes)} keys, max difference {worst}")
                del merged
                cells += [f"{mech:.3f}", f"{mech / flat:.1f}x"]
            else:
                cells += ["not run", ""]
            line = f"| {dtype_name} | {k} | " + " | ".join(cells) + " |"
            print(line, flush=True)
            lines.append(line)
            del sources, target, per_tensor_target, per_tensor_sources
    notes = [
        "",
        "Bound: the machine's streaming rate is the faster of torch.add(out=) over two whole shards (2 reads + 1 write)",
        "and a copy of one (1 read + 1 write), timed in the same rounds; a soup of K shards reads K and writes 1,",
        "so bound = (K+1) x shard bytes at that rate.",
        f"sd-mecha: {'version ' + mecha + ', n_average of the same in-memory state dicts, its defaults' if mecha else 'not run (pip install --no-deps sd-mecha; --mecha)'}.",
    ]
    print("\n".join(notes), flush=True)
    lines += notes
    if args.lean_k:
        lines += ["", *lean_bench(shapes, args.lean_k, args.lean_dir, label=label)]
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
