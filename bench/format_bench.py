"""Load time of a single-file (A1111/LDM-named) checkpoint against the same weights in diffusers' naming.

    python bench/format_bench.py [--repeats 5] [--dtype float16] [--folder /tmp/format-bench]

Builds SD 1.5's UNet shapes (859.5M parameters) with random weights, writes them once as a
diffusers-named .safetensors file and once as a full LDM single file (the UNet under
`model.diffusion_model.`, plus stand-ins of a VAE and text encoder's size, as A1111 saves), then
times, interleaved, what the studio does to load a shard: detect the format, map its names
(header only), check it against the base and read every UNet tensor into memory as fp32. Files are
read from the page cache (read once before timing), so the ratio measures our work, not the disk.
Prints medians and the ratio (target: single file at most 1.5x the diffusers file).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import interleaved_medians, machine  # noqa: E402
from soup_bench import SD15_UNET  # noqa: E402

from soup_ui.modelfiles import formats, ldm_names  # noqa: E402
from soup_ui.modelfiles.checkpoints import LazyWeights, check_finite  # noqa: E402

def write_files(folder: Path, dtype: torch.dtype) -> tuple[Path, Path, dict, dict]:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    config = dict(unet.config)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    specs = {k: (tuple(s), {torch.float16: "F16", torch.float32: "F32"}[dtype]) for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    diffusers_file, single_file = folder / "unet-diffusers.safetensors", folder / "model-single-file.safetensors"
    if not (diffusers_file.is_file() and single_file.is_file()):
        g = torch.Generator().manual_seed(0)
        weights = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
        save_file(weights, str(diffusers_file))
        names = ldm_names.ldm_unet_names(list(weights), config)
        full = {formats.LDM_PREFIX + names[k]: v for k, v in weights.items()}
        # Stand-ins for the rest of an A1111 checkpoint (VAE 83.7M, CLIP-L text encoder 123M parameters).
        full["first_stage_model.stand_in.weight"] = torch.zeros(83_653_863, dtype=dtype)
        full["cond_stage_model.transformer.stand_in.weight"] = torch.zeros(123_060_480, dtype=dtype)
        save_file(full, str(single_file))
    return diffusers_file, single_file, config, specs


def load(path: Path, config: dict, specs: dict) -> int:
    """What Studio.load does with a shard's file, minus the pool: detect, check, read, check finite."""
    found = formats.detect(path, config, specs)
    formats.check_against_base(found, specs, path.name)
    lazy = LazyWeights(path, "cpu", torch.float32, found.names)
    tensors = {k: lazy[k] for k in lazy.read_order()}
    lazy.close()
    check_finite(path, tensors)
    return len(tensors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/format-bench"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    diffusers_file, single_file, config, specs = write_files(args.folder, dtype)
    assert load(diffusers_file, config, specs) == load(single_file, config, specs) == len(specs)
    t_diffusers, t_single = interleaved_medians(
        [lambda: load(diffusers_file, config, specs), lambda: load(single_file, config, specs)], args.repeats
    )
    size = lambda p: p.stat().st_size / 1e9  # noqa: E731
    print(f"Machine: {machine()}; SD 1.5 UNet shapes, {len(specs)} tensors, {args.dtype} on disk, read as float32; median of {args.repeats}\n")
    print("| file | size | load (detect, map names, check, read, finite check) | ratio |")
    print("|---|---|---|---|")
    print(f"| diffusers-named UNet .safetensors | {size(diffusers_file):.2f} GB | {t_diffusers:.2f} s | 1.00x |")
    print(f"| A1111/LDM single file (UNet + VAE + text encoder) | {size(single_file):.2f} GB | {t_single:.2f} s | {t_single / t_diffusers:.2f}x |")
    header = lambda: formats.detect(single_file, config, specs)  # noqa: E731
    (t_header,) = interleaved_medians([header], args.repeats)
    print(f"\nDetecting and mapping the single file's names alone (header only, diffusers' converter on meta tensors): {t_header * 1000:.0f} ms")


if __name__ == "__main__":
    main()
