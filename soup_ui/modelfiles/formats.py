"""What a checkpoint is, and its UNet weights in the base's (diffusers') naming.

The format is read from the safetensors header (tensor names and shapes), never from a file name:

| found                                   | becomes                                                    |
|-----------------------------------------|------------------------------------------------------------|
| diffusers UNet (file, `unet/` folder, sharded, `fp16` variant, or a pipeline folder's `unet/`) | itself |
| LDM / A1111 / civitai single file (`model.diffusion_model.*`, or bare `input_blocks.*`), UNet-only or full | diffusers names via diffusers' own `convert_ldm_unet_checkpoint`; VAE, text encoder, EMA and scheduler tensors ignored |
| LoRA, DoRA (peft, kohya, LyCORIS), LyCORIS full network | what it changes in the base's weights, kept small (see `adapters`) |
| LoHa, LoKr, OFT, BOFT, GLoRA, IA3...       | refused, naming it (see `adapters`)                        |

Name mapping is header-only: diffusers' converter is run on "meta" tensors (shapes without data),
so validating a single-file checkpoint reads no weights, and loading it reads each tensor once by
its stored name (lean mode streams it like any other file).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import adapters
from .checkpoints import CheckpointError, Found, file_variant, read_header, weight_files
from .families import BY_WIDTH, TEXT_PREFIXES, cross_attention_width, of_denoiser
from .ldm_names import LDM_PREFIX, ldm_unet_names

logger = logging.getLogger(__name__)

# Other parts of a full single-file checkpoint, by what a person would call them.
OTHER_PARTS = {
    "first_stage_model.": "VAE",
    "cond_stage_model.": "text encoder",
    "conditioner.": "text encoders",
    "model_ema.": "EMA copy",
    "text_encoders.": "text encoders",
    "vae.": "VAE",
}


def family(width: int) -> str:
    return f"{BY_WIDTH[width]} ({width}-wide cross-attention)" if width in BY_WIDTH else f"a UNet with {width}-wide cross-attention"


def architecture(keys) -> str | None:
    """What kind of denoiser tensor names (of a checkpoint or a LoRA, in any naming) belong to:
    "a UNet", "an SD3 transformer", "a FLUX.1 transformer", or None when the names do not say."""
    flat = " ".join(k.replace("_", ".") for k in keys)
    if "double.blocks." in flat or "single.blocks." in flat or "single.transformer.blocks." in flat:
        return "a FLUX.1 transformer"
    if "joint.blocks." in flat or ("transformer.blocks." in flat and "pos.embed" in flat):
        return "an SD3 transformer"
    if "down.blocks." in flat or "input.blocks." in flat or "mid.block." in flat or "middle.block." in flat:
        return "a UNet"
    return None


def _prefix_kind(name: str) -> str | None:
    return next((kind for prefix, kind in OTHER_PARTS.items() if name.startswith(prefix)), None)


def detect(path: str | Path, base_config: Mapping, base_specs: Mapping[str, tuple] | None = None) -> Found:
    """Detect the checkpoint at `path` and map its UNet tensors to the base's names (header only).
    Without `base_specs` (detecting the base itself), every UNet tensor found is kept.

    Raises CheckpointError naming what was found when it cannot be used."""
    path = Path(path)
    files = weight_files(path)
    headers = {f: read_header(f) for f in files}
    keys = [k for h in headers.values() for k in h]
    where = f"a pipeline folder's {files[0].parent.name}/" if path.is_dir() and (path / "model_index.json").is_file() else None
    variant = file_variant(files[0])
    adapters.refused(path, keys)
    if adapters.is_adapter(keys):
        kind = f"{adapters.naming(keys)} LoRA"  # adapters.read says which kind (DoRA, LyCORIS full)
    elif any(".img_attn.qkv." in k for k in keys):
        kind = "original FLUX.1 transformer file"
    elif any(".x_block.attn.qkv." in k for k in keys):
        kind = "original SD3 single file"
    elif any(k.startswith(LDM_PREFIX) for k in keys) or "input_blocks.0.0.weight" in keys:
        kind = "LDM single-file checkpoint"
    else:
        kind = "diffusers UNet" if of_denoiser(base_config).denoiser == "unet" else "diffusers transformer"
    # A checkpoint of another family says so before any tensor-by-tensor comparison.
    width = cross_attention_width({k: v for h in headers.values() for k, v in h.items()}, lora="LoRA" in kind)
    base_width = cross_attention_width(base_specs) if base_specs else None
    if width and base_width and width != base_width:
        raise CheckpointError(f"{path.name}: {'an' if kind.startswith('LDM') else 'a'} {kind} for {family(width)}; this base is {family(base_width)}")
    ours, theirs = architecture(base_specs or ()), architecture(keys)
    if ours and theirs and ours != theirs:
        what = kind if "LoRA" in kind else "checkpoint"
        raise CheckpointError(f"{path.name}: a {what} of {theirs.split(' ', 1)[1]}; this base's denoiser is {ours.split(' ', 1)[1]}")
    if "LoRA" in kind:
        return adapters.read(path, files, base_config, base_specs)
    if kind.startswith("original"):
        return _original_transformer(path, files, headers, kind)
    if kind.startswith("LDM"):
        return _ldm(path, files, headers, base_config, base_specs)
    if where:
        kind += f" ({where})"
    if variant:
        kind += f" ({variant} variant)"
    found = Found(path, kind, files)
    for file, header in headers.items():
        for name, spec in header.items():
            if base_specs is None or name in base_specs:
                found.names[name], found.specs[name] = (file, name), spec
            else:
                found.ignored[_prefix_kind(name) or "tensors the base lacks"] += 1
    if not found.names and keys:
        raise CheckpointError(
            f"{path.name}: not a checkpoint this studio reads: none of its {len(keys)} tensors is a UNet weight in diffusers "
            f"or LDM naming, nor a LoRA (first names: {', '.join(keys[:3])})"
        )
    return found


def _ldm(path: Path, files: list[Path], headers: dict, base_config: Mapping, base_specs: Mapping) -> Found:
    """An original-LDM (A1111, civitai, ComfyUI) checkpoint, mapped by diffusers' own converter run on
    meta tensors: each converted tensor is the very object it came from, which names its source."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefixed = any(k.startswith(LDM_PREFIX) for h in headers.values() for k in h)
    meta, source, ignored = {}, {}, Counter()
    for file, header in headers.items():
        for name, (shape, _) in header.items():
            full = name if prefixed else LDM_PREFIX + name
            if not full.startswith(LDM_PREFIX):
                ignored[_prefix_kind(name) or "other tensors (scheduler buffers...)"] += 1
                continue
            tensor = torch.empty(shape, device="meta")
            meta[full], source[id(tensor)] = tensor, (file, name)
    try:
        converted = convert_ldm_unet_checkpoint(meta, dict(base_config))
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path.name}: an LDM single-file checkpoint that diffusers cannot convert to this base's UNet ({err!r})") from None
    parts = sorted(set(ignored) - {"other tensors (scheduler buffers...)", "EMA copy"})
    kind = "LDM single-file checkpoint" + (f" (full: {', '.join(parts)} too)" if parts else " (UNet only)")
    found = Found(path, kind, files, ignored=ignored)
    for name, tensor in converted.items():
        if tensor is None:
            continue
        if id(tensor) not in source:  # the converter computed a new tensor: not a pure renaming
            raise CheckpointError(f"{path.name}: {kind}: tensor {name!r} is not a renamed tensor; this converter is not supported")
        file, stored = source.pop(id(tensor))
        found.names[name] = (file, stored)
        found.specs[name] = headers[file][stored]
    if source:
        found.ignored["UNet tensors the base lacks"] += len(source)
    return found


ORIGINAL_CONVERTERS = {  # diffusers' own, by the kind detected
    "original FLUX.1 transformer file": "convert_flux_transformer_checkpoint_to_diffusers",
    "original SD3 single file": "convert_sd3_transformer_checkpoint_to_diffusers",
}


def _original_transformer(path: Path, files: list[Path], headers: dict, kind: str) -> Found:
    """A FLUX.1 transformer as Black Forest Labs distributes it (`double_blocks.*`), or an SD3 single
    file (`model.diffusion_model.joint_blocks.*`), through diffusers' own converter. It splits fused
    q/k/v projections and swaps scale and shift, so it is not a renaming: it is run on meta tensors
    for names and shapes (validation stays header-only), and on the data when the shard is loaded
    (`Found.convert`; such a shard is held in memory, never streamed)."""
    from diffusers.loaders import single_file_utils

    converter = getattr(single_file_utils, ORIGINAL_CONVERTERS[kind])
    keep, ignored, dtypes = {}, Counter(), Counter()
    for file, header in headers.items():
        for name, (shape, dtype) in header.items():
            part = _prefix_kind(name) or ("text encoders" if name.startswith("text_encoders.") else None)
            if part:
                ignored[part] += 1
            else:
                keep[name] = (file, tuple(shape))
                dtypes[dtype] += 1
    try:
        converted = converter({n: torch.empty(shape, device="meta") for n, (_, shape) in keep.items()})
    except (KeyError, IndexError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path.name}: an {kind} that diffusers cannot convert ({err!r})") from None
    dtype = dtypes.most_common(1)[0][0] if dtypes else "BF16"

    def convert() -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        tensors = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                tensors.update({n: f.get_tensor(n) for n in f.keys() if n in keep})
        return converter(tensors)

    found = Found(path, kind, files, ignored=ignored, convert=convert)
    found.specs = {n: (tuple(t.shape), dtype) for n, t in converted.items() if t is not None}
    return found


def check_against_base(found: Found, base_specs: Mapping[str, tuple], label: str) -> None:
    """Every base tensor present with the base's shape, any floating dtype; raises CheckpointError
    naming the detected format and the first tensor that is wrong."""
    if found.lora is not None:
        return
    denoiser = (architecture(base_specs) or "a UNet").split(" ", 1)[1]
    missing = [k for k in base_specs if k not in found.specs]
    if missing:
        raise CheckpointError(
            f"shard {label!r} ({found.kind}) does not match the base {denoiser}: it lacks tensor {missing[0]!r} ({len(missing)} missing)"
        )
    for key, (shape, dtype) in base_specs.items():
        other_shape, other_dtype = found.specs[key]
        if tuple(other_shape) != tuple(shape):
            raise CheckpointError(
                f"shard {label!r} ({found.kind}) does not match the base {denoiser}: tensor {key!r} has shape {list(other_shape)}, "
                f"the base has {list(shape)}"
            )
        if other_dtype[0] in "FB" and dtype[0] in "FB":  # F16, F32, BF16...: mixed in fp32, rounded once
            continue
        if other_dtype != dtype:
            raise CheckpointError(f"shard {label!r} ({found.kind}): tensor {key!r} is {other_dtype}, the base is {dtype}")
    if found.ignored:
        logger.info("%s (%s): ignored %s", label, found.kind, found.describe_ignored())


def base_unet(base: str | Path, config: str | Path | None = None) -> tuple[dict, Found]:
    """A preset's base denoiser (UNet or transformer): its config and where its tensors lie. `base`
    is a pipeline folder or a single-file checkpoint whose configs come from the pipeline folder
    `config` (by default, the shipped configs of its family)."""
    from .families import base_config, denoiser_component

    base, folder = Path(base), base_config(base, config)
    component = denoiser_component(folder)
    denoiser_config = json.loads((folder / component / "config.json").read_text())
    return denoiser_config, detect(base if base.is_file() else base / component, denoiser_config)


def validate(path: str | Path, base_config: Mapping, base_specs: Mapping[str, tuple], label: str) -> Found:
    """Detect, check against the base and check every tensor is finite (reads the data once)."""
    from .checkpoints import LazyWeights, check_finite

    found = detect(path, base_config, base_specs)
    check_against_base(found, base_specs, label)
    if found.lora is not None:
        check_finite(path, adapters.tensors(found.lora))
    elif found.convert is not None:
        check_finite(path, found.convert())
    else:
        lazy = LazyWeights(path, names=found.names)
        check_finite(path, lazy)
        lazy.close()
    return found


def ldm_vae_names(names: list[str], config: Mapping) -> dict[str, str]:
    """diffusers AutoencoderKL tensor name -> its LDM name (without `first_stage_model.`): the inverse
    of diffusers' `convert_ldm_vae_checkpoint`, whose fixed map it uses as is. The attention's
    q/k/v/proj_out are 1x1 convolutions in LDM (see `ldm_tensor`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    blocks = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def rename(name: str) -> str:
        if name in fixed:
            return fixed[name]
        side, rest = name.split(".", 1)
        parts = rest.split(".")
        if parts[0] == "mid_block":
            if parts[1] == "resnets":
                return f"{side}.mid.block_{int(parts[2]) + 1}." + ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
            tail = ".".join(parts[3:])
            for new, old in attention.items():
                if tail.startswith(new + "."):
                    return f"{side}.mid.attn_1.{old}{tail[len(new):]}"
        if parts[0] in ("down_blocks", "up_blocks"):
            i = int(parts[1]) if parts[0] == "down_blocks" else blocks - 1 - int(parts[1])
            where = "down" if parts[0] == "down_blocks" else "up"
            if parts[2] == "resnets":
                return f"{side}.{where}.{i}.block.{parts[3]}." + ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{where}.{i}.{'downsample' if where == 'down' else 'upsample'}.conv." + ".".join(parts[5:])
        raise CheckpointError(f"no LDM name for VAE tensor {name!r}")

    return {name: rename(name) for name in names}


# Where each family's text encoder(s) live in an original single file: OpenAI CLIP under `transformer.`
# (transformers' naming, diffusers' `convert_ldm_clip_checkpoint`), OpenCLIP under `model.` (open_clip's
# naming, diffusers' `convert_open_clip_checkpoint`).
OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def ldm_open_clip_tensors(text_encoder: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model (SD 2.x's, SDXL's second) in open_clip's naming: the inverse of
    diffusers' `convert_open_clip_checkpoint` (its fixed map used as is; q, k and v joined into
    `in_proj`; the projection transposed), checked by running that converter on the result."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        convert_open_clip_checkpoint,
    )

    state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in text_encoder.items()}
    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out = {}
    for name, tensor in state.items():
        if name in fixed:
            out[prefix + fixed[name]] = tensor.T.contiguous() if name == "text_projection.weight" else tensor
            continue
        match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", name)
        if match is None:
            if name.endswith("position_ids"):
                continue
            raise CheckpointError(f"no open_clip name for text-encoder tensor {name!r}")
        layer, rest = match.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        attention = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if attention:
            if attention.group(1) == "q":  # q, k, v stacked, as nn.MultiheadAttention stores them
                parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{x}_proj.{attention.group(2)}"] for x in "qkv"]
                out[f"{block}attn.in_proj_{attention.group(2)}"] = torch.cat(parts)
            continue
        for new, old in OPEN_CLIP_LAYER:
            if rest.startswith(new + "."):
                rest = old + rest[len(new) :]
                break
        out[block + rest] = tensor
    width = state["text_model.final_layer_norm.weight"].shape[0]
    config = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    back = convert_open_clip_checkpoint(config, out, prefix=prefix)
    expected = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if set(back) != set(expected) or any(not torch.equal(back[k], v) for k, v in expected.items()):
        raise CheckpointError("the open_clip names of this text encoder do not convert back")
    return out


def open_clip_unused(out: Mapping[str, torch.Tensor], prefix: str, base_file: Path | None) -> dict[str, torch.Tensor]:
    """What an SD 2.x single file carries of OpenCLIP ViT-H besides the text encoder diffusers keeps:
    the last residual block (SD 2.x conditions on the penultimate one), `text_projection` and
    `logit_scale`. ComfyUI's and A1111's loaders expect them. Copied from the base's single file when
    it has them; otherwise (a diffusers base has dropped them) neutral ones, which change no image:
    a block of zeros (its layer norms output zero, so attention and MLP add nothing: the identity),
    the identity projection and OpenCLIP's logit scale ln(100)."""
    if base_file is not None and Path(base_file).is_file():
        from safetensors import safe_open

        with safe_open(str(base_file), "pt") as f:
            copied = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and k not in out}  # noqa: SIM118
        if copied:
            return copied
    blocks = sorted({int(k[len(prefix):].split(".")[2]) for k in out if k.startswith(prefix + "transformer.resblocks.")})
    last = f"{prefix}transformer.resblocks.{blocks[-1]}."
    new = f"{prefix}transformer.resblocks.{blocks[-1] + 1}."
    extra = {new + k[len(last):]: torch.zeros_like(v) for k, v in out.items() if k.startswith(last)}
    width = out[prefix + "ln_final.weight"].shape[0]
    dtype = out[prefix + "ln_final.weight"].dtype
    extra[prefix + "text_projection"] = torch.eye(width, dtype=dtype)
    extra[prefix + "logit_scale"] = torch.tensor(math.log(100.0), dtype=dtype)
    return extra


def ldm_checkpoint(unet: Mapping[str, torch.Tensor], unet_config: Mapping, vae: Mapping[str, torch.Tensor], vae_config: Mapping,
                   text_encoders: list[Mapping[str, torch.Tensor]], family: str, base_file: Path | None = None) -> dict[str, torch.Tensor]:
    """A whole pipeline as one original-LDM checkpoint (what A1111, Forge and ComfyUI load), every
    name checked by diffusers' own LDM -> diffusers converters mapping it back to the same tensor.
    `family`: "sd1" (a CLIP text encoder), "sd2" (OpenCLIP) or "sdxl" (both), see `text_family`.
    `base_file`: the base's own single file, if it is one (SD 2.x's unused OpenCLIP parts come from it)."""
    out = {LDM_PREFIX + ldm: unet[name] for name, ldm in ldm_unet_names(list(unet), unet_config).items()}
    out.update(ldm_parts(vae, vae_config, text_encoders, family, base_file))
    return out


def ldm_parts(vae: Mapping[str, torch.Tensor], vae_config: Mapping, text_encoders: list[Mapping[str, torch.Tensor]], family: str,
              base_file: Path | None = None) -> dict[str, torch.Tensor]:
    """The VAE and text encoder(s) of an original-LDM checkpoint (see `ldm_checkpoint`)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    out = {}
    vae_names = ldm_vae_names(list(vae), vae_config)
    attention = (".mid.attn_1.q.weight", ".mid.attn_1.k.weight", ".mid.attn_1.v.weight", ".mid.attn_1.proj_out.weight")
    vae_ldm = {ldm: vae[name][:, :, None, None] if ldm.endswith(attention) and vae[name].ndim == 2 else vae[name] for name, ldm in vae_names.items()}
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_ldm.items()}, dict(vae_config))
    if set(back) != set(vae) or any(not torch.equal(back[k], vae[k]) for k in vae):
        raise CheckpointError("the LDM names of this VAE do not convert back")
    out.update({"first_stage_model." + k: v for k, v in vae_ldm.items()})
    if len(text_encoders) != len(TEXT_PREFIXES[family]):
        raise CheckpointError(f"a {family} pipeline has {len(TEXT_PREFIXES[family])} text encoder(s), got {len(text_encoders)}")
    for text_encoder, (naming, prefix) in zip(text_encoders, TEXT_PREFIXES[family]):
        if naming == "open_clip":
            out.update(ldm_open_clip_tensors(text_encoder, prefix))
            if family == "sd2":
                out.update(open_clip_unused(out, prefix, base_file))
            continue
        # LDM keeps transformers' `text_model.` level (CLIPTextModel's own state dict drops it since transformers 5.6).
        text = {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in text_encoder.items()}
        plain = lambda names: {k.removeprefix("text_model.") for k in names}  # noqa: E731
        if plain(convert_ldm_clip_checkpoint(text, prefix)) != plain(text_encoder):
            raise CheckpointError("the LDM names of this text encoder do not convert back")
        out.update(text)
    return out


def text_family(pipe) -> str:
    """Which layout a pipeline's text encoders take: "flux" (CLIP + T5), "sd3" (two CLIPs + T5),
    "sdxl" (two), "sd2" (OpenCLIP, whose activation is gelu) or "sd1" (OpenAI CLIP, quick_gelu)."""
    name = type(pipe).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


# -- text encoders ("mix text encoders too") --------------------------------------------------------
# Text-encoder tensors are named "<pipeline component>.<name>": "text_encoder.encoder.layers.0...",
# and for SDXL also "text_encoder_2....". In an original single file each component has its place:
TEXT_PARTS = {  # prefix -> (component, naming)
    "cond_stage_model.transformer.": ("text_encoder", "clip"),  # SD 1.x
    "cond_stage_model.model.": ("text_encoder", "open_clip"),  # SD 2.x
    "conditioner.embedders.0.transformer.": ("text_encoder", "clip"),  # SDXL
    "conditioner.embedders.1.model.": ("text_encoder_2", "open_clip"),
}


@dataclass
class TextEncoderFound:
    """A shard's own text encoder(s): where each tensor lies, under the base's "<component>.<name>" names."""

    kind: str  # for people: "the pipeline folder's text_encoder/", "the CLIP text encoder of an LDM single file"
    files: list[Path]
    names: dict[str, tuple[Path, str]] = field(default_factory=dict)  # base name -> (file, stored name)
    ignored: Counter = field(default_factory=Counter)
    open_clip: dict[str, str] = field(default_factory=dict)  # component -> prefix of an OpenCLIP encoder, converted when read


def text_encoder_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a transformers model folder: `model.safetensors`, sharded with an
    index, or a variant (`model.fp16.safetensors`); pickles are refused, saying why."""
    for index in [folder / "model.safetensors.index.json", *sorted(folder.glob("model.safetensors.index.*.json"))]:
        if index.is_file():
            return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for single in [folder / "model.safetensors", *sorted(folder.glob("model.*.safetensors"))]:
        if single.is_file():
            return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{folder}: the text encoder is stored only as a pickle ({', '.join(pickles)}), refused because unpickling can run "
            "arbitrary code; save it with safe_serialization=True"
        )
    raise CheckpointError(f"{folder}: no model.safetensors in this text encoder folder")


def _component(base_specs: Mapping[str, tuple], component: str) -> dict[str, tuple]:
    return {k[len(component) + 1 :]: v for k, v in base_specs.items() if k.startswith(component + ".")}


def find_text_encoder(path: str | Path, base_specs: Mapping[str, tuple]) -> TextEncoderFound | None:
    """The shard's own text encoder(s), mapped to the base's names (`base_specs`: "<component>.<name>"
    -> (shape, dtype), floating tensors only), or None when the shard has none (a UNet file or
    folder, a LoRA): it then counts as the base's. Header only (an OpenCLIP encoder is converted when
    first read, `read_open_clip`). Integer buffers (`position_ids`, which some checkpoints store) are
    never mixed: they are left out here. Raises CheckpointError naming the first tensor that does not
    fit the base's text encoder."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    path = Path(path)
    components = sorted({k.split(".", 1)[0] for k in base_specs})
    if path.is_dir():
        if not (path / "model_index.json").is_file() or not (path / "text_encoder").is_dir():
            return None
        found = TextEncoderFound(f"the pipeline folder's {', '.join(c + '/' for c in components)}", [])
        for component in components:
            if not (path / component).is_dir():
                raise CheckpointError(f"{path.name}: a pipeline folder without {component}/ (the base has one)")
            files = text_encoder_files(path / component)
            found.files += files
            headers = {file: read_header(file) for file in files}  # once per file
            stored = {name: (file, name) for file, header in headers.items() for name in header}
            specs = {name: spec for header in headers.values() for name, spec in header.items()}
            _match_text_encoder(path, found, specs, stored, base_specs, component)
        return found
    header = read_header(path)
    parts = {prefix: part for prefix, part in TEXT_PARTS.items() if any(k.startswith(prefix) for k in header)}
    if not parts:
        return None
    names = {"clip": "CLIP", "open_clip": "OpenCLIP"}
    found = TextEncoderFound(f"the {' and '.join(names[n] for _, n in parts.values())} text encoder{'s' if len(parts) > 1 else ''} of an LDM single file", [path])
    if sorted(c for c, _ in parts.values()) != components:
        raise CheckpointError(f"{path.name}: {found.kind} do not match the base's ({', '.join(components)})")
    for prefix, (component, naming) in parts.items():
        if naming == "open_clip":  # q, k and v are slices of one tensor: converted with its data, when first used
            found.open_clip[component] = prefix
            continue
        # diffusers' own LDM -> transformers renaming, run on meta tensors (a pure renaming: each
        # result is the very tensor it came from, which names its source)
        meta = {k: torch.empty(shape, device="meta") for k, (shape, _) in header.items() if k.startswith(prefix)}
        source = {id(t): k for k, t in meta.items()}
        converted = convert_ldm_clip_checkpoint(meta, prefix)
        stored = {name: (path, source[id(t)]) for name, t in converted.items() if id(t) in source}
        _match_text_encoder(path, found, {n: header[k] for n, (_, k) in stored.items()}, stored, base_specs, component)
    return found


def read_open_clip(found: TextEncoderFound, base_specs: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """The OpenCLIP text encoder(s) of a single file (SD 2.x's, SDXL's second) under the base's names,
    through diffusers' `convert_open_clip_checkpoint` (it slices q, k and v out of one tensor, so
    this reads the data)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open

    path, out = found.files[0], {}
    for component, prefix in found.open_clip.items():
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        width = tensors[prefix + "ln_final.weight"].shape[0] if prefix + "ln_final.weight" in tensors else 0
        converted = convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=width)), tensors, prefix=prefix)
        specs = {k: (tuple(v.shape), "F32" if v.is_floating_point() else str(v.dtype)) for k, v in converted.items()}
        matched = _match_text_encoder(path, TextEncoderFound(found.kind, [path]), specs, {k: k for k in converted}, base_specs, component)
        out.update({target: converted[name] for target, name in matched.names.items()})
    return out


def _match_text_encoder(path: Path, found: TextEncoderFound, specs: dict, sources: dict, base_specs: Mapping[str, tuple],
                        component: str) -> TextEncoderFound:
    """Map one text encoder's tensors (`specs`: name -> (shape, dtype); `sources`: name -> where it is)
    to the base's `component`; every tensor of the base's must be there with its shape."""
    base = _component(base_specs, component)
    plain = {name.removeprefix("text_model."): name for name in base}  # transformers >= 5.6 drops `text_model.` (CLIPTextModel)
    for name, source in sources.items():
        target = plain.get(name.removeprefix("text_model."))
        if target is None:
            found.ignored["integer buffers (position_ids), never mixed" if name.endswith("position_ids") else "text-encoder tensors the base lacks"] += 1
            continue
        shape, dtype = specs[name]
        if tuple(shape) != tuple(base[target][0]) or dtype[0] not in "FB":
            raise CheckpointError(
                f"{path.name}: {found.kind} does not match the base's {component}: tensor {name!r} is {dtype} {list(shape)}, "
                f"the base has {base[target][1]} {list(base[target][0])}"
            )
        found.names[f"{component}.{target}"] = source
    missing = [n for n in base if f"{component}.{n}" not in found.names]
    if missing:
        raise CheckpointError(f"{path.name}: {found.kind} does not match the base's {component}: it lacks tensor {missing[0]!r} ({len(missing)} missing)")
    return found
