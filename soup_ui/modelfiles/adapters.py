"""Adapters as shards: what a LoRA-class file changes in the base's weights, merged as its own tool
merges it, or refused in one line naming what it is.

| found (tensor names)                                   | becomes                                                   |
|--------------------------------------------------------|-----------------------------------------------------------|
| LoRA, diffusers/peft or kohya naming (`lora_A`/`lora_B`, `lora_down`/`lora_up`, `alpha`) | W + scale * up @ down (scale = alpha / rank; peft's `lora_adapter_metadata`: its r, lora_alpha, patterns, rsLoRA) |
| DoRA, peft (`lora_magnitude_vector`)                   | m * (W + scale * up @ down) / its norm per output channel, as peft merges it |
| DoRA, LyCORIS / kohya (`dora_scale`)                   | the same with LyCORIS' norm (per output or per input channel, + float32 eps), as lycoris merges it |
| LyCORIS "full" network (`diff`, `diff_b`)               | W + diff (and bias + diff_b): a plain weight difference   |
| LoHa, LoKr, OFT, BOFT, GLoRA, IA3, norm networks, Tucker LoCon | refused, naming the network type                  |

Module names go through diffusers' own LoRA conversion (kohya, old diffusers and peft namings); a
LyCORIS tensor that conversion does not carry (a DoRA scale, a `diff`) is found by identity: the
conversion moves tensors, and a tensor's object names the key it came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .checkpoints import CheckpointError, Found
from .families import of_denoiser

# A tensor-name part -> what the file is; each is refused: no exact merge into a weight difference here.
REFUSED = {
    "hada_w1": "a LyCORIS LoHa network",
    "lokr_w1": "a LyCORIS LoKr network",
    "oft_blocks": "a LyCORIS OFT network",
    "oft_diag": "a LyCORIS OFT network",
    "diag_oft": "a LyCORIS OFT network",
    "oft_r": "a peft OFT adapter",
    "boft_r": "a peft BOFT adapter",
    "lora_mid": "a LyCORIS LoCon with a mid (Tucker) weight",
    "a1": "a LyCORIS GLoRA network",
    "on_input": "a LyCORIS IA3 network",
    "ia3_l": "a peft IA3 adapter",
    "w_norm": "a LyCORIS norm-layer network",
}
SUPPORTED = "LoRA and DoRA (diffusers, peft, kohya or LyCORIS naming) and LyCORIS full networks are supported"
LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora.down.", ".lora.up.", ".lora_A.", ".lora_B.", ".lora_magnitude_vector")
KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_")
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"))
METADATA_KEY = "lora_adapter_metadata"  # the LoraConfig diffusers' save_lora_weights may store; diffusers merges with it


@dataclass
class LowRank:
    """One LoRA-adapted weight W: W + scale * up @ down. With a DoRA `magnitude` m:
    m * (W + scale * up @ down) / ||W + scale * up @ down||, the norm taken per output channel
    (peft; LyCORIS' default) or per input channel (LyCORIS' `wd_on_output=False`), plus `eps`
    (LyCORIS adds float32's; peft nothing)."""

    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    scale: float
    magnitude: torch.Tensor | None = None
    per_input: bool = False
    eps: float = 0.0

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """The change to the base weight `base`, in float32 (a DoRA's depends on the weight itself)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        change = (self.scale * (up @ down)).reshape(base.shape).to(base.device)
        if self.magnitude is None:
            return change
        weight = base.float() + change
        ones = [1] * (weight.dim() - 1)
        if self.per_input:
            norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(weight.shape[1], *ones).transpose(0, 1)
        else:
            norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
        magnitude = self.magnitude.float().to(base.device).reshape(norm.shape)
        return weight * (magnitude / (norm + self.eps)) - base.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = {"up": self.up, "down": self.down}
        return parts if self.magnitude is None else {**parts, "magnitude": self.magnitude}

    def to(self, device) -> LowRank:
        magnitude = None if self.magnitude is None else self.magnitude.to(device)
        return LowRank(self.up.to(device), self.down.to(device), self.scale, magnitude, self.per_input, self.eps)


@dataclass
class Difference:
    """A weight difference stored whole (LyCORIS "full"): W + diff."""

    diff: torch.Tensor

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        return self.diff.float().reshape(base.shape).to(base.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"diff": self.diff}

    def to(self, device) -> Difference:
        return Difference(self.diff.to(device))


Adapter = LowRank | Difference


def refused(path: Path, keys) -> None:
    """CheckpointError naming the network type, for an adapter this studio cannot merge exactly."""
    for key in keys:
        for part in key.lower().split("."):
            marker = next((m for m in REFUSED if part == m or part.startswith(m + "_")), None)
            if marker:
                raise CheckpointError(f"{path.name}: {REFUSED[marker]} ({marker} tensors); {SUPPORTED}")


def is_adapter(keys) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) or any(m in k for m in LORA_MARKERS) for k in keys)


def naming(keys) -> str:
    return "kohya" if any(k.startswith(KOHYA_PREFIXES) for k in keys) else "diffusers/peft"


def read(path: Path, files: list[Path], base_config: Mapping, base_specs: Mapping):
    """The adapter at `path` as a `checkpoints.Found` whose `lora` maps each base tensor it changes to an
    `Adapter`; CheckpointError naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    if len(files) != 1:
        raise CheckpointError(f"{path.name}: an adapter split over {len(files)} files is not supported")
    try:
        with safe_open(str(files[0]), "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{files[0]}: not a readable safetensors file ({err})") from None
    stems = {k.removesuffix(".diff") for k in raw if k.endswith(".diff")}
    dora = any(k.endswith((".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")) for k in raw)
    kind = f"{naming(raw)} {'DoRA' if dora else 'LoRA'}".replace("kohya DoRA", "LyCORIS DoRA (kohya naming)")
    if stems:
        kind = "LyCORIS full network (weight differences)"
        if any(not k.endswith((".diff", ".diff_b", ".alpha")) for k in raw):
            raise CheckpointError(f"{path.name}: a LyCORIS network mixing full and other modules; {SUPPORTED}")
    owner = of_denoiser(base_config)  # the family whose pipeline reads (and converts) its LoRAs
    component = owner.denoiser
    # A full network goes through the same conversion as stand-in LoRA pairs: the diff as the down weight.
    state_in = dict(raw) if not stems else {f"{s}.lora_down.weight": raw[f"{s}.diff"] for s in stems} | {f"{s}.lora_up.weight": torch.zeros(1, 1) for s in stems}
    state, alphas = _convert(path, kind, state_in, owner, base_config)
    origin = {id(t): k for k, t in raw.items()}
    config = _metadata_config(metadata, component)
    prefix = component + "."
    found = Found(path, kind, files, lora={})
    text = [k for k in state if k.startswith(("text_encoder", "te_"))]
    if text:
        found.ignored["text-encoder LoRA tensors"] += len(text)
    for key in state:
        marker = next((m for m in PAIRS if key.endswith(m[0])), None)
        if not key.startswith(prefix) or marker is None:
            continue
        module = key[len(prefix) : -len(marker[0])]
        down = state[key]
        target = _target(module, base_specs)
        if target is None:
            found.ignored["adapter modules the base lacks"] += 1
            continue
        shape = base_specs[target][0]
        stored = origin.get(id(down), "")  # the key in the file this tensor was read from
        if stems:
            stem = stored.removesuffix(".diff")
            if stem not in stems:
                raise CheckpointError(f"{path.name}: {kind}: module {module!r} is not a renaming of one in the file; this naming is not supported")
            found.lora[target] = _checked(path, kind, target, shape, Difference(raw[stem + ".diff"]))
            if stem + ".diff_b" in raw:
                bias = target.removesuffix("weight") + "bias"
                if bias in base_specs:
                    found.lora[bias] = _checked(path, kind, bias, base_specs[bias][0], Difference(raw[stem + ".diff_b"]))
            continue
        up = state.get(key[: -len(marker[0])] + marker[1])
        if up is None:
            raise CheckpointError(f"{path.name}: {kind}: {key!r} has no matching up (B) weight")
        rank = down.shape[0]
        alpha = next((alphas[k] for k in (f"{key}.alpha", f"{prefix}{module}.alpha", f"{module}.alpha") if k in alphas), None)
        scale = _scale(config, module, rank) if config else (float(alpha) / rank if alpha is not None else 1.0)
        low = LowRank(up, down, scale)
        if up.shape[0] != shape[0] or math.prod(down.shape[1:]) != math.prod(shape[1:]):
            raise CheckpointError(
                f"{path.name}: {kind} for another architecture: its {target.removesuffix('.weight')} is "
                f"{up.shape[0]}x{math.prod(down.shape[1:])}, this base's is {list(shape)}"
            )
        if dora:
            _add_magnitude(path, kind, low, state, key[: -len(marker[0])], raw, stored, shape)
        found.lora[target] = low
    if not found.lora:
        raise CheckpointError(f"{path.name}: a {kind} with no {component} module this base has")
    return found


def _convert(path: Path, kind: str, state: dict, owner, base_config: Mapping) -> tuple[dict, dict]:
    """diffusers' own conversion of a LoRA state dict to peft's names (and FLUX's alphas)."""
    import diffusers

    try:
        if owner.denoiser == "unet":  # unet_config: kohya SDXL LoRAs name blocks as the original model does (input_blocks_4_1_...)
            args = dict(unet_config=SimpleNamespace(**dict(base_config)))  # read by attribute, as a model's config is
        else:
            args = dict(return_alphas=True) if owner.pipeline == "FluxPipeline" else {}
        out = getattr(diffusers, owner.pipeline).lora_state_dict(state, **args)
    except (ValueError, KeyError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"{path.name}: a {kind} that diffusers cannot read ({err})") from None
    return (out[0], out[1] or {}) if isinstance(out, tuple) else (out, {})


def _metadata_config(metadata: Mapping[str, str], component: str) -> dict | None:
    """The denoiser's LoraConfig fields from the file's `lora_adapter_metadata`, as diffusers reads them."""
    if METADATA_KEY not in metadata:
        return None
    packed = json.loads(metadata[METADATA_KEY])
    fields = {k.removeprefix(component + "."): v for k, v in packed.items() if k.startswith(component + ".")}
    return fields or None


def _scale(config: Mapping, module: str, rank: int) -> float:
    """peft's scaling for `module` under a LoraConfig: lora_alpha / r (rsLoRA: / sqrt(r)), with its
    per-module rank and alpha patterns."""
    from peft.utils.other import get_pattern_key

    r = config.get("r", rank)
    alpha = config.get("lora_alpha", r)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(list(ranks), module), r)
    alpha = alphas.get(get_pattern_key(list(alphas), module), alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _add_magnitude(path: Path, kind: str, low: LowRank, state: dict, stem: str, raw: dict, stored: str, shape) -> None:
    """Give `low` its DoRA magnitude: LyCORIS' `dora_scale` (which diffusers' conversion drops: found
    beside the down weight it came with) or peft's `lora_magnitude_vector` (which it keeps)."""
    if stored.endswith(".lora_down.weight") and stored.removesuffix(".lora_down.weight") + ".dora_scale" in raw:
        magnitude = raw[stored.removesuffix(".lora_down.weight") + ".dora_scale"]
        # (out, 1, ...): norms per output channel (LyCORIS' default); (1, in, ...): per input channel
        per_input, eps = magnitude.dim() > 1 and magnitude.shape[0] == 1 and shape[0] != 1, torch.finfo(torch.float32).eps
    else:
        magnitude = next((state[stem + s] for s in (".lora_magnitude_vector", ".lora_magnitude_vector.weight") if stem + s in state), None)
        per_input, eps = False, 0.0  # peft: per output channel, no eps
    if magnitude is None:
        raise CheckpointError(f"{path.name}: {kind}: module {stem!r} has no DoRA magnitude (peft) or dora_scale (LyCORIS)")
    if magnitude.numel() != (shape[1] if per_input else shape[0]):
        raise CheckpointError(f"{path.name}: {kind}: the DoRA magnitude of {stem!r} is {list(magnitude.shape)}, the weight {list(shape)}")
    low.magnitude, low.per_input, low.eps = magnitude, per_input, eps


def _checked(path: Path, kind: str, target: str, shape, adapter: Difference) -> Difference:
    if math.prod(adapter.diff.shape) != math.prod(shape):
        raise CheckpointError(f"{path.name}: {kind} for another architecture: its {target} is {list(adapter.diff.shape)}, this base's is {list(shape)}")
    return adapter


def _target(module: str, base_specs: Mapping) -> str | None:
    """The base weight a LoRA module adapts (`...to_q` -> `...to_q.weight`; the old attention-processor
    names `...attn1.processor.to_out_lora` -> `...attn1.to_out.0.weight` too)."""
    plain = module.replace(".processor.", ".")
    for candidate in (module, plain, plain + ".0"):
        for name in (f"{candidate}.weight", f"{candidate}.base_layer.weight"):
            if name in base_specs:
                return name
    return None


def tensors(adapters: Mapping[str, Adapter]) -> dict[str, torch.Tensor]:
    """An adapter's tensors by name (`<weight>.up`, `<weight>.down`...), e.g. for the NaN / Inf check."""
    return {f"{k}.{part}": t for k, a in adapters.items() for part, t in a.tensors().items()}
