"""diffusers UNet tensor names -> their names in an original LDM (A1111, ComfyUI) checkpoint.

diffusers ships only LDM -> diffusers. Its converter renames: fixed layers (DIFFUSERS_TO_LDM_MAPPING,
used here as is), resnet sub-layers (the replacements below, the inverse of
`update_unet_resnet_ldm_to_diffusers`) and blocks by index arithmetic (the inverse of
`convert_ldm_unet_checkpoint`'s). `ldm_unet_names` checks its result by running that converter on it.
Below both the family table (block maps) and the formats (single-file exports), which use it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .checkpoints import CheckpointError

LDM_PREFIX = "model.diffusion_model."
RESNET_TO_LDM = [
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
]


def ldm_unet_names(names: list[str], config: Mapping) -> dict[str, str]:
    """diffusers UNet tensor name -> its name in an original LDM checkpoint (without the
    `model.diffusion_model.` prefix), proven by diffusers' own converter mapping every result back."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        convert_ldm_unet_checkpoint,
    )

    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    stride = config["layers_per_block"] + 1
    up_has_attention = {i: any(n.startswith(f"up_blocks.{i}.attentions.") for n in names) for i in range(len(config["block_out_channels"]))}

    def resnet(rest: str) -> str:
        for new, old in RESNET_TO_LDM:
            if rest.startswith(new + "."):
                return old + rest[len(new) :]
        return rest

    def rename(name: str) -> str:
        if name in fixed:
            return fixed[name]
        parts = name.split(".")
        if parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.{stride(i+1)}.0.op.*
                return f"input_blocks.{stride * (block + 1)}.0.op." + ".".join(parts[5:])
            index = stride * block + int(parts[3]) + 1
            rest = ".".join(parts[4:])
            return f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        if parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            return f"middle_block.{2 * int(parts[2])}.{resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        if parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                return f"output_blocks.{stride * block + stride - 1}.{2 if up_has_attention[block] else 1}.conv." + ".".join(parts[5:])
            index = stride * block + int(parts[3])
            rest = ".".join(parts[4:])
            return f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        raise CheckpointError(f"no LDM name for UNet tensor {name!r}")

    out = {name: rename(name) for name in names}
    # The proof: diffusers' converter takes every LDM name back to the name it came from.
    tagged = {LDM_PREFIX + ldm: torch.empty(1, device="meta") for ldm in out.values()}
    back = convert_ldm_unet_checkpoint(tagged, dict(config))
    origin = {id(t): name for name, t in zip(out, tagged.values())}
    wrong = [n for n, t in back.items() if t is not None and origin.get(id(t)) != n]
    if len(tagged) != len(out) or wrong or {n for n, t in back.items() if t is not None} != set(out):
        raise CheckpointError(f"the LDM names of this UNet do not convert back (first: {wrong[:1] or sorted(set(out) - set(back))[:1]})")
    return out
