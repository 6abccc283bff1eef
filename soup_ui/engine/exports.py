"""Files a soup is written as: the merged denoiser (diffusers names), one LDM single file for A1111,
Forge and ComfyUI, or a whole diffusers pipeline folder; each written atomically, with the recipe."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import StudioError
from ..files import atomic_path
from ..modelfiles import checkpoints, families, formats
from .mix import Mix

if TYPE_CHECKING:
    from .studio import Studio

logger = logging.getLogger(__name__)


A1111_METHODS = {"average": "Weighted sum", "add-difference": "Add difference"}  # A1111 merger's interp_method for ours


def legacy_hash(path: str | Path) -> str:
    """A1111's short model hash (`legacy_hash`): sha256 of the 64 KiB at 1 MiB into the weights file, 8 hex digits."""
    file = checkpoints.weight_files(path)[0]
    with open(file, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def a1111_recipe(mix: Mix, half: bool) -> tuple[dict, dict]:
    """`sd_merge_recipe` and `sd_merge_models` as A1111's checkpoint merger writes them: the recipe
    of a weighted sum (A (1 - M) + B M) or an add difference (A + M (B - C)) where the mix is one, else
    the same fields naming our method; each source by sha256 with its file name, legacy hash and its
    own recipe (a soup of merges keeps their ancestry, as A1111 does)."""
    pairs = list(mix.pairs)
    method = A1111_METHODS.get(mix.method.name) if len(pairs) <= 3 else None
    if mix.method.name == "average" and len(pairs) == 1:
        method = "No interpolation"
    elif mix.method.name == "average" and len(pairs) != 2:
        method = None
    multiplier = pairs[1][1] if method == "Weighted sum" else mix.params.values().get("alpha") if method == "Add difference" else None
    hashes = [s.sha256 for s, _ in pairs[:3]] + [None] * 3
    recipe = {
        "type": "webui", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1], "tertiary_model_hash": hashes[2],
        "interp_method": method or mix.method.name, "multiplier": multiplier, "save_as_half": half, "custom_name": mix.label,
        "config_source": 0, "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False,
    }
    if mix.blocked:  # SuperMerger's MBW fields: B's share (weighted sum) or alpha (add difference) per block, in block order
        per_block = [mix.method.for_block(mix.weights, mix.multipliers(b), mix.params) for b in range(len(mix.block_map))]
        alphas = None
        if method == "Weighted sum":
            alphas = [w[1] if w is not None else 0.0 for w, _ in per_block]
        elif method == "Add difference":
            alphas = [p.alpha for _, p in per_block]
        recipe.update({"mbw": True, "weights_alpha": mix.block_map.format(alphas) if alphas is not None else None,
                       "block_ids": ",".join(mix.block_map.ids)})
    models = {}
    for shard, _ in pairs:
        own = _own_metadata(shard.path)
        models[shard.sha256] = {"name": shard.path.name, "legacy_hash": legacy_hash(shard.path), "sd_merge_recipe": own.get("sd_merge_recipe")}
        models.update(own.get("sd_merge_models") or {})
    return recipe, models


def _own_metadata(path: Path) -> dict:
    """A shard file's own merge metadata (JSON values decoded, as A1111 reads them), if it is one file."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    out = {}
    for key in ("sd_merge_recipe", "sd_merge_models"):
        try:
            out[key] = json.loads(metadata[key]) if key in metadata else None
        except json.JSONDecodeError:
            out[key] = None
    return out


def modelspec(family: str, prediction: str, size: int | None, distilled: bool | None) -> dict[str, str]:
    """modelspec.architecture, prediction type and resolution: SD 2.x is "stable-diffusion-v2-768-v"
    for v-prediction models and "stable-diffusion-v2-512" for epsilon ones; FLUX schnell (not
    guidance-distilled) is "flux-1-schnell"."""
    name = families.ARCHITECTURES[family]
    if family == "sd2":
        name = "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512"
    if distilled is False:
        name = "flux-1-schnell"
    out = {"modelspec.architecture": name, "modelspec.prediction_type": "v" if prediction == "v_prediction" else prediction}
    if size:
        out["modelspec.resolution"] = f"{size}x{size}"
    return out


def architecture(studio: Studio) -> dict[str, str]:
    """`modelspec` of the studio's pipeline: its family, scheduler's prediction type and native size."""
    prediction = studio.pipe.scheduler.config.get("prediction_type", "epsilon")
    sample = getattr(studio.pipe, "default_sample_size", None) or studio.hybrid.config.get("sample_size")
    size = sample * studio.pipe.vae_scale_factor if isinstance(sample, int) else None
    return modelspec(studio.family, prediction, size, studio.renderer.guidance_distilled)


def merge_metadata(studio: Studio, mix: Mix, half: bool = False) -> dict[str, str]:
    return merge_metadata_of(mix, architecture(studio), half)


def merge_metadata_of(mix: Mix, spec: dict[str, str], half: bool = False) -> dict[str, str]:
    """The recipe as safetensors metadata: ours in full (`soup_ui.recipe`), A1111's merger layout
    (`sd_merge_recipe`, `sd_merge_models`: read by A1111, SuperMerger and civitai) and Stability AI's
    model spec (shown by ComfyUI, Forge and the A1111 model browser). No date unless asked
    (SOURCE_DATE_EPOCH, the reproducible-builds convention), so the same recipe gives the same bytes."""
    recipe, models = a1111_recipe(mix, half)
    metadata = {
        "format": "pt",
        "soup_ui.recipe": json.dumps({"label": mix.label, **mix.recipe()}, sort_keys=True),
        "sd_merge_recipe": json.dumps(recipe),
        "sd_merge_models": json.dumps(models),
        "modelspec.sai_model_spec": "1.0.0",
        **spec,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": mix.label,
    }
    if os.environ.get("SOURCE_DATE_EPOCH"):
        stamp = datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.timezone.utc)
        metadata["modelspec.date"] = stamp.date().isoformat()
    return metadata


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, then its header's metadata sorted: safetensors writes the metadata
    map in a random order each process, so two identical exports had different bytes."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never the case for the same content; leave the file as written
            logger.warning("%s: header not re-ordered (%d > %d bytes)", path.name, len(text), size)
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def denoiser_file(studio: Studio, mix: Mix, out: str | Path, overwrite: bool = True) -> Path:
    """The merged denoiser as .safetensors in diffusers' naming, with the recipe in the metadata."""
    out = Path(out)
    tensors = studio.souped_weights(mix)
    metadata = merge_metadata(studio, mix, half=next(iter(tensors.values())).dtype == torch.float16)
    with atomic_path(out, overwrite=overwrite) as tmp:
        save(tensors, tmp, metadata)
    logger.info("exported %s to %s", metadata["modelspec.title"], out)
    return out


def single_file(studio: Studio, mix: Mix, out: str | Path, overwrite: bool = True) -> Path:
    """The soup as one fp16 checkpoint in the original LDM naming, UNet + VAE + text encoder (the
    base's, or the merge of the shards' when the mix says so): what A1111, Forge and ComfyUI load."""
    if studio.family not in families.LDM_FAMILIES:
        raise StudioError(
            f"a single-file (LDM) export is for SD 1.x, SD 2.x and SDXL; export this {studio.renderer.family_name} soup as its {studio.kind.denoiser} "
            "(diffusers names, which diffusers and ComfyUI load) or as a pipeline folder"
        )
    out = Path(out)
    unet = studio.souped_weights(mix)
    metadata = merge_metadata(studio, mix, half=True)
    texts = studio.text_state(mix)
    base = Path(studio.preset.base)
    tensors = formats.ldm_checkpoint(unet, studio.hybrid.config, studio.pipe.vae.state_dict(), studio.pipe.vae.config, texts, studio.family,
                                     base_file=base if base.is_file() else None)
    tensors = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in tensors.items()}
    with atomic_path(out, overwrite=overwrite) as tmp:
        save(tensors, tmp, metadata)
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
