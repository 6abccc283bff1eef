"""Files a soup is written as: the merged denoiser (diffusers names), one LDM single file for A1111,
Forge and ComfyUI, or a whole diffusers pipeline folder; each written atomically, with the recipe."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import families, formats
from .errors import StudioError
from .files import atomic_path
from .mix import Mix

if TYPE_CHECKING:
    from .studio import Studio

logger = logging.getLogger(__name__)


def merge_metadata(studio: Studio, mix: Mix) -> dict[str, str]:
    """The recipe as safetensors metadata: ours, what A1111's merger and SuperMerger read, and
    Stability AI's model spec (shown by ComfyUI, Forge and the A1111 model browser)."""
    recipe = mix.recipe()
    return {
        "format": "pt",
        "soup_ui.recipe": json.dumps(recipe),
        "sd_merge_recipe": json.dumps({"type": "diffusion-soup", "label": mix.label, **recipe}),
        "sd_merge_models": json.dumps({s["sha256"]: {"name": s["name"], "weight": s["weight"]} for s in recipe["shards"]}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "flux-1-schnell" if studio.guidance_distilled is False else families.ARCHITECTURES[studio.family],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": mix.label,
        "modelspec.date": datetime.date.today().isoformat(),
    }


def denoiser_file(studio: Studio, mix: Mix, out: str | Path, overwrite: bool = True) -> Path:
    """The merged denoiser as .safetensors in diffusers' naming, with the recipe in the metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    tensors = studio.souped_weights(mix)
    metadata = merge_metadata(studio, mix)
    with atomic_path(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("exported %s to %s", metadata["modelspec.title"], out)
    return out


def single_file(studio: Studio, mix: Mix, out: str | Path, overwrite: bool = True) -> Path:
    """The soup as one fp16 checkpoint in the original LDM naming, UNet + VAE + text encoder (the
    base's, or the merge of the shards' when the mix says so): what A1111, Forge and ComfyUI load."""
    from safetensors.torch import save_file

    if studio.family not in families.LDM_FAMILIES:
        raise StudioError(
            f"a single-file (LDM) export is for SD 1.x, SD 2.x and SDXL; export this {studio.family_name} soup as its {studio.kind.denoiser} "
            "(diffusers names, which diffusers and ComfyUI load) or as a pipeline folder"
        )
    out = Path(out)
    unet = studio.souped_weights(mix)
    metadata = merge_metadata(studio, mix)
    texts = studio.text_state(mix)
    tensors = formats.ldm_checkpoint(unet, studio.hybrid.config, studio.pipe.vae.state_dict(), studio.pipe.vae.config, texts, studio.family)
    tensors = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in tensors.items()}
    with atomic_path(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("exported %s to %s (single file, LDM naming)", metadata["modelspec.title"], out)
    return out


def pipeline_files(studio: Studio) -> list[Path]:
    """What a pipeline export copies from the base folder: model_index.json and, in each component
    folder it names (the denoiser aside), the configs, tokenizer files and safetensors weights; never
    hidden files, pickles or anything else lying in the folder."""
    base = Path(studio.preset.base)
    index = json.loads((base / "model_index.json").read_text())
    keep = {".json", ".txt", ".model", ".safetensors"}
    files = [base / "model_index.json"]
    for component, value in index.items():
        folder = base / component
        if component.startswith("_") or component == studio.kind.denoiser or not isinstance(value, list) or not folder.is_dir():
            continue
        files += sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix in keep)
    return files


def pipeline_folder(studio: Studio, mix: Mix, out: str | Path, overwrite: bool = False) -> Path:
    """A complete diffusers pipeline folder whose denoiser is the soup (`DiffusionPipeline.from_pretrained`
    loads it); written to a temporary folder, then renamed into place (replacing `out` only with `overwrite`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise StudioError(f"{out.name} exists; tick 'overwrite' (--overwrite) to replace it, or choose a new folder")
    base = Path(studio.preset.base)
    recipe = json.dumps(mix.recipe(), indent=2)
    if base.is_file():  # a single-file base: every component is written from memory, the denoiser being the soup
        with studio.holding(mix) as pipe, atomic_path(out, overwrite=True, folder=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "soup_recipe.json").write_text(recipe)
        return out
    mixed_text = mix.text_key is not None
    with atomic_path(out, overwrite=True, folder=True) as tmp:
        for file in pipeline_files(studio):  # everything but the denoiser (and mixed text encoders) is the base's, byte for byte
            if mixed_text and file.parent.name in studio.text_components and file.suffix == ".safetensors":
                continue
            target = tmp / file.relative_to(base)
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(file, target)
        denoiser = studio.kind.denoiser
        (tmp / denoiser).mkdir()
        shutil.copyfile(base / denoiser / "config.json", tmp / denoiser / "config.json")
        variant = studio.variant  # the soup denoiser named like the base's files, so the folder loads as the base did
        denoiser_file(studio, mix, tmp / denoiser / f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors")
        if mixed_text:
            with studio.holding(mix) as pipe:
                for component in studio.text_components:
                    getattr(pipe, component).save_pretrained(tmp / component, safe_serialization=True, variant=variant)
        (tmp / "soup_recipe.json").write_text(recipe)
    return out
