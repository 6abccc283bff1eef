"""Slow check (not in the default test run): the shipped family configs load real-size single files offline.

    python bench/family_check.py [--families sd1 sd2 sdxl] [--folder /tmp/family-check]

For each family, random weights of its real shapes (from `soup_ui/configs/<family>`: SD 1.5, SD 2.1,
SDXL base 1.0) are written in fp16 as one original-LDM single file (UNet + VAE + text encoder(s),
through `formats.ldm_checkpoint`, i.e. A1111's layout), then loaded with no `config:` by the
studio itself (a preset whose base and shard are that file; SDXL in lean mode and fp16, so that its
2.6B UNet is held once), which renders one 64x64 image. Every tensor of every component must
come back exactly. Each tensor's random values come from a
seed derived from its name, so they are regenerated for the comparison instead of held in memory.
Needs about 2x the fp16 checkpoint in RAM (SDXL: ~14 GB) and prints one line per family.
`flux`: FLUX.1 transformer files as Black Forest Labs distributes them (see `check_flux_original`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soup_ui.modelfiles import families, formats  # noqa: E402

logger = logging.getLogger("family_check")


def random_tensor(component: str, name: str, shape) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{component}/{name}".encode()).digest()[:8], "little") % (2**63)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g) * 0.02).half()


def meta_states(family: str) -> dict[str, tuple[dict, dict]]:
    """Component -> (config, {name: shape}) from the shipped configs, built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = families.config_folder(family)
    out = {}
    with torch.device("meta"):
        for name, build in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            model = build.from_config(json.loads((folder / name / "config.json").read_text()))
            out[name] = (dict(model.config), {k: v.shape for k, v in model.state_dict().items()})
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / name).is_dir():
                model = cls(CLIPTextConfig.from_pretrained(folder / name))
                out[name] = ({}, {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")})
    return out


def write_single_file(family: str, path: Path) -> dict:
    from safetensors.torch import save_file

    states = meta_states(family)
    tensors = {c: {k: random_tensor(c, k, s) for k, s in shapes.items()} for c, (_, shapes) in states.items()}
    texts = [tensors[c] for c in ("text_encoder", "text_encoder_2") if c in tensors]
    single = formats.ldm_checkpoint(tensors["unet"], states["unet"][0], tensors["vae"], states["vae"][0], texts, family)
    save_file({k: v.contiguous() for k, v in single.items()}, str(path))
    return states


def compare(component: str, got: dict, shapes: dict) -> int:
    """How many tensors differ from the random values written."""
    plain = {k.removeprefix("text_model."): v for k, v in got.items()} if component.startswith("text") else got
    bad = 0
    for name, shape in shapes.items():
        key = name.removeprefix("text_model.") if component.startswith("text") else name
        if key not in plain or not torch.equal(plain[key].half(), random_tensor(component, name, shape)):
            bad += 1
    return bad


def check(family: str, folder: Path) -> str:
    path = folder / f"{family}-random.safetensors"
    t0 = time.perf_counter()
    states = write_single_file(family, path)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    from soup_ui.modelfiles.presets import RenderSettings, load_preset
    from soup_ui.engine.studio import RuntimeOptions, Studio

    (folder / f"{family}.yaml").write_text(f"base: {path}\nshards:\n  - name: same\n    path: {path}\n")
    # SDXL: lean (shards streamed) and fp16, so that the 2.6B UNet fits next to the file being read
    studio = Studio(load_preset(folder / f"{family}.yaml"), RuntimeOptions(lean=family == "sdxl", dtype="float16" if family == "sdxl" else None))
    loaded = time.perf_counter() - t0
    pipe = studio.pipe
    bad = {c: compare(c, getattr(pipe, c).state_dict(), shapes) for c, (_, shapes) in states.items()}  # before any mix
    image = studio.render_soup(studio.make_mix({"same": 1}), RenderSettings(prompt="a red heart", steps=2, height=64, width=64)).image
    extra = f", rendered a {image.size[0]}x{image.size[1]} image through the studio ({type(pipe).__name__})"
    total = sum(len(s) for _, s in states.values())
    size = path.stat().st_size / 1e9
    path.unlink()
    verdict = "every tensor exact" if not any(bad.values()) else f"MISMATCHES {bad}"
    return (f"{families.NAMES[family]}: {total} tensors, {size:.2f} GB fp16 file written in {written:.0f} s, "
            f"loaded with no config in {loaded:.0f} s{extra}: {verdict}")


def check_flux_original(folder: Path, double: int = 1, single: int = 1) -> str:
    """FLUX.1 transformer files as distributed (BFL naming, bf16) as shards of a FluxPipeline base at
    FLUX's widths (tiny text encoders and VAE): detected, validated from the header, converted by
    diffusers' own converter when loaded, souped (compared with the average of diffusers'
    conversions of the same files, rounded once to bf16) and rendered."""
    import yaml
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import _clip_config, bfl_shapes, make_t5_encoder, make_t5_tokenizer, make_tokenizer

    from soup_ui.modelfiles.presets import RenderSettings, load_preset
    from soup_ui.engine.studio import Studio

    shapes = bfl_shapes(double, single)
    files = {}
    for name in ("base", "ink", "pastel"):
        files[name] = folder / f"flux-{name}.safetensors"
        save_file({k: random_tensor(f"flux-{name}", k, s).bfloat16() for k, s in shapes.items()}, str(files[name]))
    config = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    transformer = FluxTransformer2DModel(**config).to(torch.bfloat16)
    transformer.load_state_dict(convert(load_file(str(files["base"]))), strict=True)
    tokenizer, t5 = make_tokenizer(folder / "_tokenizer"), make_t5_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=16, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=CLIPTextModel(_clip_config(tokenizer)), tokenizer=tokenizer,
                 text_encoder_2=make_t5_encoder(t5, 32), tokenizer_2=t5, transformer=transformer).save_pretrained(folder / "flux-base")
    del transformer
    preset = {"base": "flux-base", "shards": [{"name": n, "path": files[n].name} for n in ("ink", "pastel")]}
    (folder / "flux.yaml").write_text(yaml.safe_dump(preset))
    t0 = time.perf_counter()
    studio = Studio(load_preset(folder / "flux.yaml"))
    loaded = time.perf_counter() - t0
    kinds = {s.weights.kind for s in studio.shards.values()}
    soup = studio.souped_weights(studio.make_mix({"ink": 1, "pastel": 1}))
    a, b = (convert(load_file(str(files[n]))) for n in ("ink", "pastel"))
    bad = sum(not torch.equal(soup[k], ((a[k].float() + b[k].float()) / 2).bfloat16()) for k in soup)
    image = studio.render_soup(studio.make_mix({"ink": 1, "pastel": 1}), RenderSettings(prompt="a red heart", steps=2, height=16, width=16, scheduler="default")).image
    params = sum(t.numel() for t in soup.values())
    for file in files.values():
        file.unlink()
    verdict = "every tensor exact" if not bad and len(soup) == len(a) else f"MISMATCHES: {bad} of {len(soup)}"
    return (f"FLUX.1 original transformer files ({double} double + {single} single blocks at FLUX's widths, {params / 1e6:.0f}M parameters, "
            f"{len(shapes)} BFL tensors -> {len(soup)} diffusers tensors; {', '.join(sorted(kinds))}): loaded in {loaded:.0f} s, "
            f"souped, rendered a {image.size[0]}x{image.size[1]} image: {verdict}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=["sd1", "sd2", "sdxl", "flux"], default=["sd1", "sd2", "sdxl", "flux"])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/family-check"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.folder.mkdir(parents=True, exist_ok=True)
    lines = [check_flux_original(args.folder) if f == "flux" else check(f, args.folder) for f in args.families]
    print("\n".join(lines))
    return 0 if all("every tensor exact" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
