"""The weight pool: shards' weights loaded once per content hash (`Weights`) and where they live
(`Pool`: resident, pinned or lean), a named shard over them (`Shard`), and a LoRA shard's full
weights made one tensor at a time (`LoraTensors`)."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StudioError
from ..maths import soup
from ..modelfiles import adapters, checkpoints, formats

logger = logging.getLogger(__name__)


@dataclass
class Weights:
    """A shard's weights as loaded once, shared by every name and session that uses them (the pool)."""

    path: Path
    sha256: str
    unet: torch.nn.Module | None  # None unless resident: the weights stay in their files (lean) or in CPU memory (pinned)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    signature: tuple = ()  # the files' (size, mtime, inode) when hashed; lean mode re-checks it
    kind: str = "diffusers UNet"  # the format detected (formats.Found.kind)
    lora: dict[str, adapters.Adapter] | None = None  # an adapter (LoRA, DoRA...): kept small, added to the base at mix time
    # The shard's own text encoder (a full single file, a pipeline folder), found from the header at
    # load; hashed and read only when "mix text encoders too" first uses it. None: it counts as the base's.
    text_found: formats.TextEncoderFound | None = None
    text_encoder: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    _text_sha: str | None = None
    tier: str = "resident"  # "resident" (a module on the device), "pinned" (CPU memory, copied per soup), "lean" (its files) or "lora" (low rank)

    @property
    def text_sha(self) -> str | None:
        """The identity of its own text encoder (the hash of the files holding it), or None."""
        if self.text_found is not None and self._text_sha is None:
            files = self.text_found.files
            self._text_sha = self.sha256 if files == [self.path] else checkpoints.sha256_files(files)
        return self._text_sha

    @property
    def text_kind(self) -> str:
        return self.text_found.kind if self.text_found is not None else ""


@dataclass
class Shard:
    """A named shard of a preset or a session: a name and a default weight over pooled `Weights`."""

    name: str
    weights: Weights
    weight: float = 1.0
    description: str = ""

    @property
    def path(self) -> Path:
        return self.weights.path

    @property
    def sha256(self) -> str:
        return self.weights.sha256

    @property
    def unet(self) -> torch.nn.Module | None:
        return self.weights.unet

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self.weights.tensors

    @property
    def text_sha(self) -> str | None:
        return self.weights.text_sha


class LoraTensors(Mapping):
    """A LoRA shard's full weights, base + delta, made one tensor at a time on access (for weight
    distances; the soup itself adds the low-rank deltas directly, see Studio.mix)."""

    def __init__(self, base: Mapping[str, torch.Tensor], lora: dict[str, adapters.Adapter]):
        self.base, self.lora = base, lora

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.base[name]
        if name not in self.lora:
            return tensor
        return (tensor.float() + self.lora[name].delta(tensor)).to(tensor.dtype)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (for CPUs, the memory available to new allocations)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available

class Pool:
    """The shards' weights, loaded once per content hash and shared by every name and session that
    uses them, and where they live: on the device (resident), in pinned CPU memory, or in their
    files (lean); see `plan`. Freed when nothing uses them."""

    TIERS = ("resident", "pinned", "lean")

    def __init__(self, device: torch.device, dtype: torch.dtype, lock, options, template: torch.nn.Module,
                 base_specs: dict, text_specs: dict, base: Callable[[], Mapping[str, torch.Tensor]], on_change: Callable[[], None],
                 order: list[str] | None = None):
        self.device, self.dtype, self.lock, self.options = device, dtype, lock, options
        self.order = order  # the hybrid's flat layout: resident shards are laid out alike (one pass, one range per block)
        self.template = template  # the base denoiser: its config validates files, its copies hold resident shards
        self.base_specs, self.text_specs = base_specs, text_specs
        self.base = base  # the base's weights (a LoRA shard is base + delta)
        self.on_change = on_change  # called when pooled weights change under a mix
        self._pool: dict[str, Weights] = {}  # sha256 -> weights
        self._users: Counter[str] = Counter()  # sha256 -> how many shards (preset or session) use them

    def plan(self, count: int, unet_bytes: int, text_bytes: int = 0, exporting: bool = False) -> None:
        """Where shards live, and why (the log and the page header say it). On a GPU, as many shards as
        fit in 80% of its free memory stay resident; the rest wait in pinned CPU memory and are copied
        to the GPU tensor by tensor for each soup, or, if they do not fit there either, stream from
        their files (lean). On a CPU, shards are held in memory, or lean when they would not fit. The
        user can force one tier for all (--memory, or --lean). Counted besides the shards' denoisers:
        their own text encoders (`text_bytes` each, when the preset mixes them), a shard being loaded
        (read whole before it is pooled) and, when the path writes the soup, its CPU copy of the
        merged weights; the base pipeline is already loaded, so free memory has it counted."""
        forced = self.options.memory or {True: "lean", False: "resident"}.get(self.options.lean)
        if forced is not None and forced not in self.TIERS:
            raise StudioError(f"memory {forced!r}: choose one of {', '.join(self.TIERS)}")
        per_shard = unet_bytes + text_bytes
        sizes = f"{count} shards of {unet_bytes / 1e6:,.0f} MB" + (f" (+ {text_bytes / 1e6:,.0f} MB of text encoders each)" if text_bytes else "")
        besides = {"a shard being loaded": per_shard, "the export's copy of the soup": per_shard if exporting else 0}
        host_extra = sum(besides.values())
        counted = ", ".join(f"{what} {n / 1e9:.1f} GB" for what, n in besides.items() if n)
        need, free = count * per_shard, free_memory(self.device)
        where = {"resident": "held in memory", "pinned": "in pinned CPU memory, copied to the device for each soup",
                 "lean": "streamed from their files (lean)"}
        if forced is not None:
            self.resident_slots, self.spill = (None if forced == "resident" else 0), forced
            why = f"as asked (--memory {forced})" if self.options.memory else ("as asked (--lean)" if forced == "lean" else "as asked")
            self.memory_plan = f"{sizes} {where[forced]}: {why}"
        elif self.device.type != "cuda" or need <= 0.8 * free:
            total = need + (host_extra if self.device.type != "cuda" else 0)
            lean = total > 0.8 * free
            self.resident_slots, self.spill = (0, "lean") if lean else (None, "resident")
            detail = f" (shards {need / 1e9:.1f} GB, {counted})" if self.device.type != "cuda" else ""
            why = f"{total / 1e9:.1f} GB{detail} {'would not fit' if lean else 'fit'} in 80% of the {free / 1e9:.1f} GB free on {self.device.type}"
            self.memory_plan = f"{sizes} {where[self.spill]}: {why}"
        else:  # a GPU too small for them all: fill it, then pinned host memory, then the files
            self.resident_slots = int(0.8 * free // per_shard)
            host = free_memory(torch.device("cpu"))
            rest = count - self.resident_slots
            self.spill = "pinned" if rest * per_shard + host_extra <= 0.8 * host else "lean"
            self.memory_plan = (
                f"{sizes}: {self.resident_slots} held on {self.device.type} ({0.8 * free / 1e9:.1f} GB of its {free / 1e9:.1f} GB free), "
                f"the other {rest} {where[self.spill]} ({rest * per_shard / 1e9:.1f} GB, {counted}; {host / 1e9:.1f} GB free in CPU memory)"
            )
        self.lean = self.resident_slots == 0 and self.spill == "lean"  # every shard streamed from disk

    def tier(self) -> str:
        """The tier of the next shard loaded, by the plan and the shards resident now."""
        resident = sum(w.tier == "resident" for w in self._pool.values())
        return "resident" if self.resident_slots is None or resident < self.resident_slots else self.spill

    def load(self, path: str | Path, name: str | None = None) -> Weights:
        """Detect a checkpoint's format, validate it against the base and pool its weights (once per
        content); the caller then holds one use of them (give it back with `release`). Raises
        CheckpointError naming the format found and what is wrong."""
        path = Path(path)
        found = formats.detect(path, self.template.config, self.base_specs)
        formats.check_against_base(found, self.base_specs, name or path.name)
        try:
            text = formats.find_text_encoder(path, self.text_specs)
        except checkpoints.CheckpointError as err:  # the denoiser is still usable: its text encoder counts as the base's
            logger.warning("%s: its text encoder is not used (it counts as the base's): %s", name or path.name, err)
            text = None
        signature = checkpoints.file_signature(path)
        sha = checkpoints.sha256_file(path)
        with self.lock:
            pooled = self._pool.get(sha)
        if pooled is None:
            if found.lora is not None:
                lora = {k: a.to(self.device) for k, a in found.lora.items()}
                checkpoints.check_finite(path, adapters.tensors(lora))
                pooled = Weights(path, sha, None, LoraTensors(self.base(), lora), signature, found.kind, lora, tier="lora")
            else:
                tier = self.tier()
                if found.convert is not None and tier == "lean":  # converted with its data: held, never streamed
                    tier = "pinned" if self.device.type == "cuda" else "resident"
                    logger.info("%s (%s) is converted when read, so it is held (%s), not streamed", path.name, found.kind, tier)
                if tier == "lean":
                    lazy = checkpoints.LazyWeights(path, self.device, self.dtype, found.names)
                    checkpoints.check_finite(path, lazy)
                    pooled = Weights(path, sha, None, lazy, signature, found.kind, tier="lean")
                else:
                    where = "cpu" if tier == "pinned" else self.device
                    if found.convert is not None:
                        tensors = {k: v.to(where, self.dtype) for k, v in found.convert().items()}
                    else:
                        lazy = checkpoints.LazyWeights(path, where, self.dtype, found.names)
                        tensors = {k: lazy[k] for k in lazy.read_order()}
                        lazy.close()
                    checkpoints.check_finite(path, tensors)
                    if tier == "pinned":
                        pooled = Weights(path, sha, None, checkpoints.PinnedTensors(tensors, self.device), signature, found.kind, tier="pinned")
                    else:
                        unet = copy.deepcopy(self.template)
                        unet.load_state_dict(tensors, strict=True)
                        pooled = Weights(path, sha, unet, soup.flatten_module(unet, self.order), signature, found.kind)
            pooled.text_found = text
        with self.lock:
            pooled = self._pool.setdefault(sha, pooled)
            self._users[sha] += 1
        return pooled

    def text_encoder_of(self, weights: Weights) -> Mapping[str, torch.Tensor]:
        """A shard's own text encoder, in the studio's dtype on its device (streamed in lean mode);
        read when first used. Call under the lock."""
        if weights.text_encoder is None:
            text, path = weights.text_found, weights.path
            if text.ignored:
                logger.info("%s (%s): ignored %s", path.name, text.kind, ", ".join(f"{n} {k}" for k, n in text.ignored.items()))
            try:
                lazy = checkpoints.LazyWeights(path, self.device, self.dtype, text.names)
                if self.lean and not text.open_clip:
                    tensors = lazy
                else:  # an OpenCLIP encoder is converted with its data, so it is held
                    tensors = {k: lazy[k] for k in lazy.read_order()}
                    tensors.update({k: v.to(self.device, self.dtype) for k, v in formats.read_open_clip(text, self.text_specs).items()})
                checkpoints.check_finite(path, tensors)
            except checkpoints.CheckpointError as err:
                raise StudioError(f"cannot mix the text encoder of {path.name}: {err}") from None
            weights.text_encoder = tensors
        return weights.text_encoder

    def release(self, weights: Weights) -> None:
        """Give back one use of pooled weights; they are freed when nothing uses them."""
        with self.lock:
            self._users[weights.sha256] -= 1
            if self._users[weights.sha256] <= 0:
                del self._users[weights.sha256]
                if self._pool.get(weights.sha256) is weights:
                    del self._pool[weights.sha256]
                    self.on_change()
                    logger.info("freed the weights of %s", weights.path.name)

    def __len__(self) -> int:
        """How many distinct weights are loaded."""
        return len(self._pool)

    def fresh(self, weights: Weights) -> None:
        """Lean mode reads files at mix time: if one was rewritten since it was hashed, validate and
        hash it again, so its images are never served under the old hash."""
        if weights.tier != "lean" or weights.lora is not None:
            return  # in memory: what was hashed is what is served
        try:
            signature = checkpoints.file_signature(weights.path)
        except checkpoints.CheckpointError as err:
            raise StudioError(f"the file of shard {weights.path.name} is gone ({err})") from None
        if signature == weights.signature:
            return
        logger.info("%s changed on disk; validating and hashing it again", weights.path)
        try:
            found = formats.detect(weights.path, self.template.config, self.base_specs)
            formats.check_against_base(found, self.base_specs, weights.path.name)
            lazy = checkpoints.LazyWeights(weights.path, self.device, self.dtype, found.names)
            checkpoints.check_finite(weights.path, lazy)
        except checkpoints.CheckpointError as err:
            raise StudioError(f"{weights.path.name} changed on disk and is no longer usable: {err}") from None
        old = weights.sha256
        weights.tensors, weights.signature, weights.sha256 = lazy, signature, checkpoints.sha256_file(weights.path)
        if self._pool.get(old) is weights:
            del self._pool[old]
            self._pool[weights.sha256] = weights
            self._users[weights.sha256] += self._users.pop(old, 0)
        self.on_change()

