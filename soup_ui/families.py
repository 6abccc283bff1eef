"""The model families the studio soups, and the configs shipped for single-file bases.

`FAMILIES` is the one table of what differs between families (keyed by the diffusers pipeline
class a base's model_index.json names): which component is the denoiser that is souped, its text
encoders, how prompts are encoded and which embeddings the pipeline takes, whether latents are
packed, whether negative prompts and classifier-free guidance apply, and the page's defaults.

Configs for the well-known families are shipped, so that a single-file base loads offline with no `config:`.

`configs/<family>/` holds the small diffusers config files of SD 1.x (SD 1.5's), SD 2.x (SD 2.1's,
768 px, v-prediction) and SDXL base 1.0; `configs/clip-tokenizer/` the CLIP BPE vocabulary and merges
(rebuilt offline from open-clip-torch's, see `configs/build_clip_tokenizer.py`), shared by every
tokenizer of these families. `config_folder` assembles a family's folder, as diffusers'
`from_single_file(config=...)` reads it, in the user's cache. The family of a single file is read from
its header: SDXL by its second text encoder (`conditioner.embedders.1.*`) or its `label_emb`, and
every family by the width of the UNet's cross-attention (768, 1024 or 2048)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import CheckpointError, read_header

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}


@dataclass(frozen=True)
class Family:
    """What the studio needs to know about one kind of pipeline."""

    name: str  # for people
    pipeline: str  # the diffusers pipeline class
    denoiser: str  # the pipeline component that is souped: "unet" or "transformer"
    denoiser_class: str  # its diffusers model class (the pipeline's `lora_state_dict` reads its LoRAs)
    text_encoders: tuple[str, ...]  # components mixed under "text encoders too"
    embeddings: tuple[str | None, ...]  # encode_prompt's outputs, named as the pipeline's arguments (None: not passed)
    encode_args: dict = field(default_factory=dict)  # extra arguments of encode_prompt
    negative_prompt: bool = True  # negative prompts and classifier-free guidance apply
    flow_matching: bool = False  # sampled with its own flow-matching scheduler only
    packed: bool = False  # latents packed into 2x2 patches: the pipeline's own prepare_latents makes the noise
    long_tokenizer: str | None = None  # the T5 tokenizer whose length limits a prompt (CLIP's truncate)
    max_tokens: int | None = None  # the pipeline's max_sequence_length for that tokenizer
    load_args: dict = field(default_factory=dict)  # extra from_pretrained / from_single_file arguments
    defaults: dict = field(default_factory=dict)  # the page's render defaults: steps, guidance, scheduler (the size is the denoiser's native one)


SD_EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds")
POOLED_EMBEDDINGS = (*SD_EMBEDDINGS, "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
FAMILIES = {
    f.pipeline: f
    for f in (
        Family("SD 1.x / 2.x", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", ("text_encoder",), SD_EMBEDDINGS,
               load_args=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
               defaults=dict(steps=25, guidance_scale=7.5, scheduler="dpm++")),
        Family("SDXL", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", ("text_encoder", "text_encoder_2"), POOLED_EMBEDDINGS,
               load_args=dict(add_watermarker=False), defaults=dict(steps=30, guidance_scale=6.0, scheduler="dpm++")),
        Family("SD3 / 3.5", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", ("text_encoder", "text_encoder_2", "text_encoder_3"),
               POOLED_EMBEDDINGS, encode_args=dict(prompt_2=None, prompt_3=None), flow_matching=True, long_tokenizer="tokenizer_3",
               max_tokens=256, defaults=dict(steps=28, guidance_scale=7.0, scheduler="default")),
        Family("FLUX.1", "FluxPipeline", "transformer", "FluxTransformer2DModel", ("text_encoder", "text_encoder_2"), ("prompt_embeds", "pooled_prompt_embeds", None),
               encode_args=dict(prompt_2=None), negative_prompt=False, flow_matching=True, packed=True, long_tokenizer="tokenizer_2",
               max_tokens=512, defaults=dict(steps=28, guidance_scale=3.5, scheduler="default")),
    )
}
SD = FAMILIES["StableDiffusionPipeline"]


def of_denoiser(config: dict) -> Family:
    """The family a denoiser config belongs to, by its `_class_name` (any UNet: SD's, whose
    `lora_state_dict` also reads SDXL LoRAs given the UNet's config)."""
    return next((f for f in FAMILIES.values() if f.denoiser_class == config.get("_class_name")), SD)


SUPPORTED = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())


def denoiser_component(folder: str | Path) -> str:
    """The denoiser sub-folder of a pipeline (or config) folder: "transformer" or "unet"."""
    return "transformer" if (Path(folder) / "transformer").is_dir() else "unet"


BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # by the UNet's cross-attention (text) width


def cross_attention_width(specs: Mapping[str, tuple], lora: bool = False) -> int | None:
    """The text width a UNet (or a LoRA of one) attends to: the input width of a cross-attention key
    projection (`attn2.to_k`, in diffusers', LDM's and kohya's spellings)."""
    for name, spec in specs.items():
        flat = name.replace("_", ".")
        if "attn2.to.k" in flat and flat.endswith("weight") and len(spec[0]) > 1 and (not lora or "lora.down" in flat or "lora.A" in flat):
            return int(spec[0][1])
    return None


ARCHITECTURES = {  # modelspec.architecture
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-v3-medium", "flux": "flux-1-dev",
}
LDM_FAMILIES = ("sd1", "sd2", "sdxl")  # those with an original single-file layout written by `ldm_checkpoint`
TEXT_PREFIXES = {
    "sd1": [("clip", "cond_stage_model.transformer.")],
    "sd2": [("open_clip", "cond_stage_model.model.")],
    "sdxl": [("clip", "conditioner.embedders.0.transformer."), ("open_clip", "conditioner.embedders.1.model.")],
}


def single_file_family(path: str | Path) -> str:
    """"sd1", "sd2" or "sdxl" for an original-LDM single file (header only); CheckpointError otherwise."""
    path = Path(path)
    header = read_header(path)
    if any(k.startswith("conditioner.embedders.1.") for k in header) or "model.diffusion_model.label_emb.0.0.weight" in header:
        return "sdxl"
    width = cross_attention_width(header)
    family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
    if family is None:
        seen = f"{width}-wide cross-attention" if width else "no UNet cross-attention"
        raise CheckpointError(
            f"{path.name}: not a single file of a family with shipped configs (SD 1.x, SD 2.x, SDXL): {seen}; "
            "give `config:` naming a diffusers pipeline folder of its family"
        )
    return family


def config_folder(family: str, cache: Path | None = None) -> Path:
    """The family's config folder (model_index.json, component configs, tokenizers; no weights),
    assembled once from the shipped files in the user's cache and reused."""
    source = CONFIGS / family
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files + [CONFIGS / "clip-tokenizer" / n for n in TOKENIZER_FILES]:
        digest.update(file.name.encode() + file.read_bytes())
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "soup_ui" / "configs"
    out = root / f"{family}-{digest.hexdigest()[:12]}"
    if (out / "model_index.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{family}-"))
    for file in files:
        target = tmp / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        if file.name == "tokenizer_config.json":
            for name in TOKENIZER_FILES:
                shutil.copyfile(CONFIGS / "clip-tokenizer" / name, target.parent / name)
    try:
        tmp.rename(out)
    except OSError:  # another process assembled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_config(base: str | Path, config: str | Path | None) -> Path:
    """The config folder of a preset's base: the base folder itself, the preset's `config:`, or for a
    single file without one, the shipped configs of its family."""
    base = Path(base)
    if not base.is_file():
        return base
    if config is not None:
        return Path(config)
    return config_folder(single_file_family(base))
