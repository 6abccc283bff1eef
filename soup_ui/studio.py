"""The studio engine: a base pipeline, its shard UNets and one preallocated hybrid UNet.

Loading, mixing (via `soup.average_into`), rendering with a shared initial noise, and caching.
No UI here: `ui.py` and `cli.py` call this.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import checkpoints, families, formats, soup
from .files import atomic_path
from .presets import SCHEDULERS, Preset, RenderDefaults, RenderSettings

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


class StudioError(ValueError):
    """A request the studio cannot carry out; the message says why, and nothing was changed."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how models run; kept apart from presets and recipes."""

    device: str | None = None  # None: cuda if available, else mps, else cpu
    dtype: str | None = None  # None: float16 on GPU, float32 on CPU (fp16 maths is slow on CPUs)
    cache_size: int = 512  # rendered images kept in memory
    lean: bool | None = None  # stream shards from memory-mapped files; None: when they would not fit
    memory: str | None = None  # force where shards live: "resident", "pinned" or "lean" (None: planned, see Studio.plan_memory)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (for CPUs, the memory available to new allocations)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return 1 << 34


def resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(device: torch.device, name: str | None) -> torch.dtype:
    if name:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise StudioError(f"dtype {name!r} is not a torch floating point type (try float16 or float32)")
        return dtype
    return torch.float32 if device.type == "cpu" else torch.float16


def folder_variant(folder: Path) -> str | None:
    """The variant a pipeline folder was saved with (`save_pretrained(variant="fp16")` writes
    `unet/diffusion_pytorch_model.fp16.safetensors`), or None for plain files."""
    denoiser = Path(folder) / families.denoiser_component(folder)
    try:
        return checkpoints.file_variant(checkpoints.weight_files(denoiser)[0]) if denoiser.is_dir() else None
    except checkpoints.CheckpointError:
        return None


def pipeline_class(folder: Path) -> tuple[type, families.Family]:
    """The diffusers pipeline class a base folder (or config folder) names in its model_index.json,
    and its family; StudioError naming any other class."""
    import diffusers

    try:
        name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise StudioError(f"{folder}: no readable model_index.json ({err})") from None
    if name not in families.FAMILIES:
        raise StudioError(f"{folder}: a {name}, which the studio does not soup; it soups {families.SUPPORTED}")
    return getattr(diffusers, name), families.FAMILIES[name]


@dataclass
class Weights:
    """A shard's weights as loaded once, shared by every name and session that uses them (the pool)."""

    path: Path
    sha256: str
    unet: torch.nn.Module | None  # None unless resident: the weights stay in their files (lean) or in CPU memory (pinned)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    signature: tuple = ()  # the files' (size, mtime, inode) when hashed; lean mode re-checks it
    kind: str = "diffusers UNet"  # the format detected (formats.Found.kind)
    lora: dict[str, formats.LowRank] | None = None  # a LoRA: kept low rank, added to the base at mix time
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

    def __init__(self, base: Mapping[str, torch.Tensor], lora: dict[str, formats.LowRank]):
        self.base, self.lora = base, lora

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.base[name]
        if name not in self.lora:
            return tensor
        return (tensor.float() + self.lora[name].delta(tensor.shape).to(tensor.device)).to(tensor.dtype)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


INTERACTIVE, BACKGROUND = 0, 1


class PriorityLock:
    """A re-entrant lock that interactive work gets first: a background holder (a grid, leave-one-out)
    takes it per image, and waits while any interactive request is waiting, so a slider release
    waits for at most the one image being rendered. A thread's priority is set with `background()`."""

    def __init__(self):
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._waiting = [0, 0]
        self._local = threading.local()

    @property
    def priority(self) -> int:
        return getattr(self._local, "priority", INTERACTIVE)

    @contextmanager
    def background(self):
        """Run the enclosed work at background priority (in this thread)."""
        before = self.priority
        self._local.priority = BACKGROUND
        try:
            yield
        finally:
            self._local.priority = before

    def __enter__(self):
        me, priority = threading.get_ident(), self.priority
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return self
            self._waiting[priority] += 1
            try:
                while self._owner is not None or (priority == BACKGROUND and self._waiting[INTERACTIVE]):
                    self._cond.wait()
            finally:
                self._waiting[priority] -= 1
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()


@dataclass
class Rendered:
    """One labelled image of a render."""

    label: str
    image: Image.Image
    kind: str  # "component", "soup" or "ensemble"
    info: dict = field(default_factory=dict)  # measurements shown with the image (distances, t, ...)


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def hit(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


Views = Mapping[str, Shard]  # a session's shards by name


class Studio:
    """Holds one preset's models and renders components and soups of them.

    Weights are pooled by content hash: a file added by several sessions (under any names) is
    loaded once, and freed when no preset shard and no session uses it. Every method that takes a
    mix also takes `shards`, the caller's view (name -> Shard; default: the preset's shards), so a
    session can only ever name its own shards.
    """

    def __init__(self, preset: Preset, options: RuntimeOptions = RuntimeOptions(), progress: Progress | None = None):
        self.preset = preset
        self.options = options
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(self.device, options.dtype)
        self.lock = PriorityLock()  # one mix+render at a time: the hybrid UNet and the pipeline are shared
        self.renders: Counter[str] = Counter()  # UNet denoising runs by kind, for tests and benchmarks
        self.failed: dict[str, str] = {}  # shard name -> why it was left out
        self.shards: dict[str, Shard] = {}  # the preset's shards (and those added with add_shard)
        self._pool: dict[str, Weights] = {}  # sha256 -> weights
        self._users: Counter[str] = Counter()  # sha256 -> how many shards (preset or session) use them
        self._images = LRU(options.cache_size)
        self._text = LRU(64)
        self._mixed: tuple | None = None
        self._base_tensors: Mapping[str, torch.Tensor] | None = None
        self._text_mixed: tuple | None = None  # what the text encoder holds: None for the base's, else a mix key
        self._base_text: dict[str, torch.Tensor] | None = None  # the base's, copied when first mixed

        # 1. The base pipeline: tokenizer, text encoder, VAE and scheduler are shared by all shards.
        report = progress or (lambda f, d: None)
        report(0.0, "loading base pipeline")
        base = Path(preset.base)
        config = families.base_config(base, preset.config)  # the base folder, `config:`, or the shipped configs of a single file's family
        cls, self.kind = pipeline_class(config)  # the family's entry: denoiser, encoders, embeddings, defaults
        common = self.kind.load_args
        self.variant = None if base.is_file() else folder_variant(base)  # exports name their files like the base's
        try:
            if base.is_file():  # a single-file checkpoint
                self.pipe = cls.from_single_file(str(base), config=str(config), torch_dtype=self.dtype, **common)
            else:  # a diffusers folder, also one saved with variant="fp16" (files named *.fp16.safetensors)
                self.pipe = cls.from_pretrained(base, dtype=self.dtype, use_safetensors=True, variant=self.variant, **common)
            self.pipe = self.pipe.to(self.device)
        except (OSError, ValueError, EnvironmentError) as err:
            raise StudioError(f"{preset.base}: cannot load the base pipeline ({err})") from None
        self.family = formats.text_family(self.pipe)  # "sd1", "sd2", "sdxl", "sd3" or "flux": how its text encoders are laid out
        self.pipe.set_progress_bar_config(disable=True)
        self.base_scheduler = type(self.pipe.scheduler)  # the "default" scheduler
        # The text encoder's floating weights: the base's, or with "text encoders too" a soup of the
        # shards' own, written in place. Integer buffers (position_ids) are never touched.
        self.text_components = [c for c in self.kind.text_encoders if getattr(self.pipe, c, None) is not None]
        self.text_tensors = {
            f"{c}.{n}": p for c in self.text_components for n, p in getattr(self.pipe, c).named_parameters() if p.is_floating_point()
        }
        self.text_specs = {n: (tuple(p.shape), "F32") for n, p in self.text_tensors.items()}
        self.scheduler_config = dict(self.pipe.scheduler.config)
        if preset.prediction_type is not None:  # e.g. an SD 2.x 512-px (epsilon) single file: the shipped SD 2.x config says v-prediction
            self.scheduler_config["prediction_type"] = preset.prediction_type
        # Where the base UNet's tensors lie on disk, by diffusers name (a folder's unet/, or mapped from a single file).
        _, self.base_found = formats.base_unet(base, preset.config)
        self.base_specs = self.base_found.specs
        # The base denoiser's memory becomes the hybrid: mixing writes into it, never allocating anew.
        self.hybrid = getattr(self.pipe, self.kind.denoiser).eval()
        self.preset = preset.model_copy(update={"render": self._render_defaults(preset)})
        self.hybrid_tensors = soup.flatten_module(self.hybrid)  # one buffer: the soup is one pass
        self.plan_memory(len(preset.shards), sum(t.numel() * t.element_size() for t in self.hybrid_tensors.values()))
        logger.info("memory: %s", self.memory_plan)

        # 2. Every shard, validated against the base; a bad one is reported and left out.
        for i, spec in enumerate(preset.shards):
            report((i + 1) / (len(preset.shards) + 1), f"loading shard {spec.name}")
            try:
                self.add_shard(spec.name, spec.path, spec.weight, spec.description)
            except checkpoints.CheckpointError as err:
                self.failed[spec.name] = str(err)
                logger.error("shard %s left out: %s", spec.name, err)
        if not self.shards:
            raise StudioError("no shard could be loaded: " + "; ".join(self.failed.values()))
        # 3. Compile the soup kernel for the likely shard counts in the background (SD-sized UNets
        # only), so that no slider release waits 10-40 s for the compiler.
        if isinstance(self.hybrid_tensors, soup.FlatTensors) and self.hybrid_tensors.buffer.numel() >= soup.FLAT_CHUNK:
            soup.warm_up(range(1, min(len(self.shards), 6) + 1), self.dtype, self.device)
        report(1.0, "ready")

    # -- the weight pool --------------------------------------------------------------------------
    TIERS = ("resident", "pinned", "lean")

    def plan_memory(self, count: int, unet_bytes: int) -> None:
        """Where shards live, and why (the log and the page header say it). On a GPU, as many shards as
        fit in 80% of its free memory stay resident; the rest wait in pinned CPU memory and are copied
        to the GPU tensor by tensor for each soup, or, if they do not fit there either, stream from
        their files (lean). On a CPU, shards are held in memory, or lean when they would not fit. The
        user can force one tier for all (--memory, or --lean)."""
        forced = self.options.memory or {True: "lean", False: "resident"}.get(self.options.lean)
        if forced is not None and forced not in self.TIERS:
            raise StudioError(f"memory {forced!r}: choose one of {', '.join(self.TIERS)}")
        sizes = f"{count} shards of {unet_bytes / 1e6:,.0f} MB"
        need, free = count * unet_bytes, free_memory(self.device)
        where = {"resident": "held in memory", "pinned": "in pinned CPU memory, copied to the device for each soup",
                 "lean": "streamed from their files (lean)"}
        if forced is not None:
            self.resident_slots, self.spill = (None if forced == "resident" else 0), forced
            why = f"as asked (--memory {forced})" if self.options.memory else ("as asked (--lean)" if forced == "lean" else "as asked")
            self.memory_plan = f"{sizes} {where[forced]}: {why}"
        elif self.device.type != "cuda" or need <= 0.8 * free:
            lean = need > 0.8 * free
            self.resident_slots, self.spill = (0, "lean") if lean else (None, "resident")
            why = f"{need / 1e9:.1f} GB {'would not fit' if lean else 'fit'} in 80% of the {free / 1e9:.1f} GB free on {self.device.type}"
            self.memory_plan = f"{sizes} {where[self.spill]}: {why}"
        else:  # a GPU too small for them all: fill it, then pinned host memory, then the files
            self.resident_slots = int(0.8 * free // unet_bytes)
            host = free_memory(torch.device("cpu"))
            rest = count - self.resident_slots
            self.spill = "pinned" if rest * unet_bytes <= 0.8 * host else "lean"
            self.memory_plan = (
                f"{sizes}: {self.resident_slots} held on {self.device.type} ({0.8 * free / 1e9:.1f} GB of its {free / 1e9:.1f} GB free), "
                f"the other {rest} {where[self.spill]} ({rest * unet_bytes / 1e9:.1f} GB; {host / 1e9:.1f} GB free in CPU memory)"
            )
        self.lean = self.resident_slots == 0 and self.spill == "lean"  # every shard streamed from disk

    def _tier(self) -> str:
        """The tier of the next shard loaded, by the plan and the shards resident now."""
        resident = sum(w.tier == "resident" for w in self._pool.values())
        return "resident" if self.resident_slots is None or resident < self.resident_slots else self.spill

    def load(self, path: str | Path, name: str | None = None) -> Weights:
        """Detect a checkpoint's format, validate it against the base and pool its weights (once per
        content); the caller then holds one use of them (give it back with `release`). Raises
        CheckpointError naming the format found and what is wrong."""
        path = Path(path)
        found = formats.detect(path, self.hybrid.config, self.base_specs)
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
                lora = {k: formats.LowRank(r.up.to(self.device), r.down.to(self.device), r.scale) for k, r in found.lora.items()}
                checkpoints.check_finite(path, formats.lora_tensors(lora))
                pooled = Weights(path, sha, None, LoraTensors(self.base_tensors, lora), signature, found.kind, lora, tier="lora")
            else:
                tier = self._tier()
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
                        unet = copy.deepcopy(self.hybrid)
                        unet.load_state_dict(tensors, strict=True)
                        pooled = Weights(path, sha, unet, soup.flatten_module(unet), signature, found.kind)
            pooled.text_found = text
        with self.lock:
            pooled = self._pool.setdefault(sha, pooled)
            self._users[sha] += 1
        return pooled

    def _text_encoder_of(self, weights: Weights) -> Mapping[str, torch.Tensor]:
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
                    self._mixed = None
                    logger.info("freed the weights of %s", weights.path.name)

    @property
    def pooled(self) -> int:
        """How many distinct weights are loaded."""
        return len(self._pool)

    def _fresh(self, weights: Weights) -> None:
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
            found = formats.detect(weights.path, self.hybrid.config, self.base_specs)
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
        self._mixed = None

    # -- shards ---------------------------------------------------------------------------------
    def add_shard(self, name: str, path: str | Path, weight: float = 1.0, description: str = "") -> Shard:
        """Load a shard into the preset's set (the CLI's and every new session's); raises
        CheckpointError and changes nothing on failure."""
        if name in self.shards:
            raise checkpoints.CheckpointError(f"a shard named {name!r} is already loaded")
        shard = Shard(name, self.load(path, name), weight, description)
        with self.lock:
            self.shards[name] = shard
        logger.info("loaded shard %s from %s", name, path)
        return shard

    def remove_shard(self, name: str) -> None:
        with self.lock:
            shard = self.shards.pop(self._known(name, self.shards).name)
        self.release(shard.weights)

    def _known(self, name: str, shards: Views | None = None) -> Shard:
        view = self.shards if shards is None else shards
        shard = view.get(name)
        if shard is None:
            known = ", ".join(view) or "none"
            raise StudioError(f"unknown shard {name!r} (loaded: {known})")
        return shard

    # -- the soup -------------------------------------------------------------------------------
    def normalized(self, mix: dict[str, float], shards: Views | None = None) -> list[tuple[Shard, float]]:
        """Check a {shard name: weight} mix and normalize its weights; raises StudioError."""
        resolved = [self._known(n, shards) for n in mix]
        try:
            weights = soup.normalize_weights(list(mix.values()), list(mix))
        except ValueError as err:
            raise StudioError(str(err)) from None
        return list(zip(resolved, weights))

    def mix_key(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0, shards: Views | None = None) -> tuple:
        """What identifies a soup's weights: shard contents, normalized weights, mode and scale."""
        return self._key(self.normalized(mix, shards), mode, scale)

    @staticmethod
    def _key(pairs: list[tuple[Shard, float]], mode: str, scale: float) -> tuple:
        if mode not in soup.MERGE_MODES:
            raise StudioError(f"unknown merge mode {mode!r} (known: {', '.join(soup.MERGE_MODES)})")
        if not math.isfinite(scale) or not 0 <= scale <= 10:
            raise StudioError(f"scale must be between 0 and 10, got {scale}")
        return (mode, scale if mode != "average" else 1.0, tuple((s.sha256, round(w, 12)) for s, w in pairs))

    @torch.no_grad()
    def _add_lora(self, sources: list[Mapping[str, torch.Tensor]], coefficients: list[float], terms: list[tuple[dict[str, formats.LowRank], float]]) -> None:
        """Each weight a LoRA adapts, computed again in float32 and rounded once:
        sum_i c_i source_i + sum_j c_j * scale_j * up_j @ down_j (the rest of the merge is untouched)."""
        for key in {k for lora, _ in terms for k in lora}:
            tensor = self.hybrid_tensors[key]
            total = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
            for source, c in zip(sources, coefficients):
                if c:
                    total += c * source[key].float()
            for lora, c in terms:
                if key in lora and c:
                    total += c * lora[key].delta(tensor.shape).to(tensor.device)
            tensor.copy_(total)

    def _text_key(self, pairs: list[tuple[Shard, float]], mode: str, scale: float, text_encoders: bool) -> tuple | None:
        """What identifies the text encoder a mix renders with: None for the base's (text encoders not
        mixed, or no selected shard has its own), else the mode and each shard's text-encoder hash
        ("base" for a shard without one) with its weight."""
        if not text_encoders or all(s.weights.text_found is None for s, _ in pairs):
            return None
        return ("text", mode, scale if mode != "average" else 1.0, tuple((s.text_sha or "base", round(w, 12)) for s, w in pairs))

    @torch.no_grad()
    def _use_text_encoder(self, pairs: list[tuple[Shard, float]], mode: str, scale: float, text_encoders: bool) -> tuple | None:
        """Make the pipeline's text encoder the one this mix renders with (the base's, or the soup of
        the shards' own with the mix's weights and mode, a shard without one counting as the base);
        in place, summed in float32 and rounded once. Call under the lock; returns its key."""
        key = self._text_key(pairs, mode, scale, text_encoders)
        if key == self._text_mixed:
            return key
        if self._base_text is None:
            self._base_text = {n: t.detach().clone() for n, t in self.text_tensors.items()}
        self._text_mixed = ("changing",)  # if mixing fails half way, the text encoder is no known mix
        if key is None:
            for name, tensor in self.text_tensors.items():
                tensor.copy_(self._base_text[name])
        else:
            sources = [self._text_encoder_of(s.weights) if s.weights.text_found is not None else self._base_text for s, _ in pairs]
            base = self._base_text if soup.MERGE_MODES[mode].needs_base else None
            soup.merge_into(mode, self.text_tensors, sources, [w for _, w in pairs], base, scale)
        self._text_mixed = key
        return key

    def label(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0, shards: Views | None = None) -> str:
        pairs = self.normalized(mix, shards)
        return soup.mixture_label([s.name for s, _ in pairs], [w for _, w in pairs], mode, scale)

    def mix(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0, shards: Views | None = None) -> str:
        """Merge the selected shards into the hybrid UNet in place; returns the recipe label.

        Skipped when the hybrid already holds this mix (same shards, normalized weights, mode)."""
        with self.lock:
            pairs = self.normalized(mix, shards)
            for s, _ in pairs:
                self._fresh(s.weights)  # before the key: a rewritten lean file changes its hash
            key = self._key(pairs, mode, scale)
            if key != self._mixed:
                base = self.base_tensors if soup.MERGE_MODES[mode].needs_base else None
                self._mixed = None  # if merging fails half way, the hybrid is not this mix
                # A LoRA shard is base + delta: the base stands in for it in the (linear) merge, and
                # its low-rank delta, times the coefficient the merge gives that shard, is added after.
                sources = [self.base_tensors if s.weights.lora is not None else s.tensors for s, _ in pairs]
                soup.merge_into(mode, self.hybrid_tensors, sources, [w for _, w in pairs], base, scale)
                loras = [(s.weights.lora, w) for s, w in pairs if s.weights.lora is not None]
                if loras:  # the merge's coefficients: w_i for an average; scale w_i and (1 - scale) for the base in task arithmetic
                    k = scale if mode == "task-arithmetic" else 1.0
                    extra = [self.base_tensors] if mode == "task-arithmetic" else []
                    self._add_lora(sources + extra, [k * w for _, w in pairs] + [1.0 - k] * len(extra), [(lora, k * w) for lora, w in loras])
                self._mixed = key
        return soup.mixture_label([s.name for s, _ in pairs], [w for _, w in pairs], mode, scale)

    @property
    def base_tensors(self) -> Mapping[str, torch.Tensor]:
        """The base UNet's weights (the hybrid overwrote them in memory): loaded once into a buffer of
        the hybrid's layout, or in lean mode read from its files on demand."""
        if self._base_tensors is None:
            lazy = checkpoints.LazyWeights(self.base_found.path, self.device, self.dtype, self.base_found.names)
            if self.lean or not isinstance(self.hybrid_tensors, soup.FlatTensors):
                self._base_tensors = lazy
            else:
                base = soup.FlatTensors(torch.empty_like(self.hybrid_tensors.buffer), self.hybrid_tensors.layout)
                for name in lazy.read_order():
                    base[name].copy_(lazy[name])
                self._base_tensors = base
        return self._base_tensors

    # -- rendering ------------------------------------------------------------------------------
    @property
    def guidance_distilled(self) -> bool | None:
        """FLUX.1 only: True for dev (guidance is an input of the transformer), False for schnell
        (guidance does nothing); None for families with classifier-free guidance."""
        return bool(self.hybrid.config.get("guidance_embeds")) if self.kind.pipeline == "FluxPipeline" else None

    @property
    def family_name(self) -> str:
        if self.guidance_distilled is False:
            return "FLUX.1 [schnell]"
        return families.NAMES.get(self.family, self.kind.name)

    def _render_defaults(self, preset: Preset) -> RenderDefaults:
        """The preset's render settings, where it sets them, else the family's: the denoiser's native
        size, and steps, guidance and scheduler (FLUX.1 schnell: 4 steps, no guidance)."""
        native = self.pipe.vae_scale_factor * (self.hybrid.config.get("sample_size") or getattr(self.pipe, "default_sample_size", 128))
        family = {"height": native, "width": native, **self.kind.defaults}
        if self.guidance_distilled is False:
            family.update(steps=4, guidance_scale=0.0)
        given = preset.render.model_fields_set
        return preset.render.model_copy(update={k: v for k, v in family.items() if k not in given})

    def check_settings(self, settings: RenderSettings) -> None:
        if self.kind.flow_matching and settings.scheduler != "default":
            raise StudioError(f"{self.family_name} samples with its own flow-matching scheduler: choose scheduler 'default', not {settings.scheduler!r}")
        if not self.kind.negative_prompt and settings.negative_prompt:
            raise StudioError(f"{self.family_name} takes no negative prompt (it has no classifier-free guidance); leave it empty")
        tokenizer = getattr(self.pipe, self.kind.long_tokenizer or "tokenizer", None) or self.pipe.tokenizer
        limit = self.kind.max_tokens or tokenizer.model_max_length
        for label, text in (("prompt", settings.prompt), ("negative prompt", settings.negative_prompt)):
            n = len(tokenizer(text).input_ids)
            if n > limit:
                raise StudioError(f"the {label} is {n} tokens long; this model reads at most {limit} (shorten it)")

    def _embeddings(self, settings: RenderSettings) -> dict[str, torch.Tensor]:
        """The pipeline's prompt embeddings for these prompts, by the pipeline's argument names (pooled
        ones for SDXL, SD3 and FLUX; negative ones where classifier-free guidance applies), cached per
        text encoder."""
        key = (self._text_mixed, settings.prompt, settings.negative_prompt)  # per text encoder
        cached = self._text.hit(key)
        if cached is None:
            extra = dict(self.kind.encode_args)
            if self.kind.negative_prompt:
                extra.update(do_classifier_free_guidance=True, negative_prompt=settings.negative_prompt)
            if self.kind.max_tokens:
                extra["max_sequence_length"] = self.kind.max_tokens  # the pipeline's default, stated
            out = self.pipe.encode_prompt(prompt=settings.prompt, device=self.device, num_images_per_prompt=1, **extra)
            cached = {name: value for name, value in zip(self.kind.embeddings, out) if name}
            self._text.put(key, cached)
        return cached

    def initial_noise(self, settings: RenderSettings) -> torch.Tensor:
        """The same starting latents for every image of a render, from the seed alone (drawn on the
        CPU, so every device starts from the same noise). FLUX packs latents into 2x2 patches: its
        pipeline's own `prepare_latents` draws and packs them."""
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        channels = self.hybrid.config.in_channels
        if self.kind.packed:
            latents, _ = self.pipe.prepare_latents(1, channels // 4, settings.height, settings.width, torch.float32, torch.device("cpu"), generator)
        else:
            factor = self.pipe.vae_scale_factor
            latents = torch.randn((1, channels, settings.height // factor, settings.width // factor), generator=generator, dtype=torch.float32)
        return latents.to(self.device, self.dtype)

    def _denoise(self, unet: torch.nn.Module, settings: RenderSettings, kind: str) -> Image.Image:
        return self._denoise_many(unet, [settings], kind)[0]

    def _denoise_many(self, unet: torch.nn.Module, batch: list[RenderSettings], kind: str) -> list[Image.Image]:
        """One denoising pass over a batch of prompts and seeds (steps, guidance, size and scheduler
        shared); each image starts from its own seed's noise, as if rendered alone. Never while a
        soup kernel compiles in the background (see `soup.TRACING`)."""
        with soup.TRACING:
            return self._denoise_locked(unet, batch, kind)

    def _denoise_locked(self, unet: torch.nn.Module, batch: list[RenderSettings], kind: str) -> list[Image.Image]:
        import diffusers

        settings = batch[0]
        shared = {"prompt", "negative_prompt", "seed"}
        if any(s.model_dump(exclude=shared) != settings.model_dump(exclude=shared) for s in batch):
            raise StudioError("a batched render needs the same steps, guidance, size and scheduler for every image")
        scheduler = SCHEDULERS[settings.scheduler]
        scheduler_cls = getattr(diffusers, scheduler) if scheduler else self.base_scheduler
        embeds = [self._embeddings(s) for s in batch]
        setattr(self.pipe, self.kind.denoiser, unet)
        self.pipe.scheduler = scheduler_cls.from_config(self.scheduler_config)
        try:
            out = self.pipe(
                **{name: torch.cat([e[name] for e in embeds]) for name in embeds[0]},
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                latents=torch.cat([self.initial_noise(s) for s in batch]),
                output_type="pil",
            )
        finally:
            setattr(self.pipe, self.kind.denoiser, self.hybrid)
        self.renders[kind] += len(batch)
        return out.images

    def cached(self, key, make: Callable[[], Image.Image]) -> Image.Image:
        """The image cached under `key`, or `make()` (called under the lock) cached under it."""
        with self.lock:
            image = self._images.hit(key)
            if image is None:
                image = make()
                self._images.put(key, image)
        return image

    def render_component(self, name: str, settings: RenderSettings, shards: Views | None = None, *, text_encoders: bool = False) -> Rendered:
        """One shard's image (with its own text encoder, if it has one, under `text_encoders`);
        cached by the shard's content hash and every render setting."""
        shard = self._known(name, shards)

        def make():
            self.check_settings(settings)
            if shard.unet is None:  # lean mode: the component is the soup of itself alone
                self.mix({name: 1.0}, shards=shards)
            self._use_text_encoder([(shard, 1.0)], "average", 1.0, text_encoders)
            return self._denoise(shard.unet or self.hybrid, settings, "component")

        with self.lock:
            self._fresh(shard.weights)
            own_text = shard.text_sha if text_encoders else None
            image = self.cached(("component", shard.sha256, own_text, settings), make)
        return Rendered(name, image, "component")

    def render_soup(
        self, mix: dict[str, float], settings: RenderSettings, mode: str = "average", scale: float = 1.0, shards: Views | None = None,
        *, text_encoders: bool = False,
    ) -> Rendered:
        """The hybrid's image for this mix (and, with `text_encoders`, the soup of the shards' text
        encoders); mix and render happen under one lock, so concurrent sessions never see each other's weights."""

        def make():
            self.check_settings(settings)
            self.mix(mix, mode, scale, shards)
            self._use_text_encoder(pairs, mode, scale, text_encoders)
            return self._denoise(self.hybrid, settings, "soup")

        with self.lock:
            pairs = self.normalized(mix, shards)
            for s, _ in pairs:
                self._fresh(s.weights)
            text = self._text_key(pairs, mode, scale, text_encoders)
            image = self.cached(("soup", self._key(pairs, mode, scale), text, settings), make)
        label = soup.mixture_label([s.name for s, _ in pairs], [w for _, w in pairs], mode, scale)
        return Rendered(label + (", text encoders mixed" if text else ""), image, "soup")

    def render_soup_batch(
        self, mix: dict[str, float], batch: list[RenderSettings], mode: str = "average", scale: float = 1.0,
        shards: Views | None = None, batch_size: int = 64, *, text_encoders: bool = False,
    ) -> list[Image.Image]:
        """The hybrid's images for many prompts and seeds, `batch_size` per denoising pass (for
        evaluations: each equals `render_soup` of its settings up to the rounding of batched maths).
        Not cached; the mix and its renders hold the lock throughout."""
        with self.lock:
            for settings in batch:
                self.check_settings(settings)
            self.mix(mix, mode, scale, shards)
            self._use_text_encoder(self.normalized(mix, shards), mode, scale, text_encoders)
            return [im for i in range(0, len(batch), batch_size) for im in self._denoise_many(self.hybrid, batch[i : i + batch_size], "soup")]

    def render(
        self,
        mix: dict[str, float],
        settings: RenderSettings,
        progress: Progress | None = None,
        mode: str = "average",
        scale: float = 1.0,
        shards: Views | None = None,
        *,
        text_encoders: bool = False,
    ) -> list[Rendered]:
        """Every selected component (in mix order), then the soup, all from the same initial noise.

        The lock is taken per image, so other requests interleave instead of waiting for all of them."""
        report = progress or (lambda f, d: None)
        self.mix_key(mix, mode, scale, shards)  # fail before any work
        with self.lock:
            self.check_settings(settings)
        out = []
        for i, name in enumerate(mix):
            report(i / (len(mix) + 1), f"rendering {name}")
            out.append(self.render_component(name, settings, shards, text_encoders=text_encoders))
        report(len(mix) / (len(mix) + 1), "rendering the soup")
        out.append(self.render_soup(mix, settings, mode, scale, shards, text_encoders=text_encoders))
        report(1.0, "done")
        return out

    # -- export ---------------------------------------------------------------------------------
    def recipe(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0, shards: Views | None = None, *, text_encoders: bool = False) -> dict:
        """Where a soup comes from: mode, scale, whether text encoders were mixed, and each shard's
        name, content hash (and its text encoder's, when mixed) and weight."""
        self.mix_key(mix, mode, scale, shards)
        return {
            "mode": mode,
            "scale": scale,
            "text_encoders": text_encoders,
            "shards": [
                {"name": s.name, "sha256": s.sha256, "weight": w, **({"text_encoder_sha256": s.text_sha} if text_encoders and s.text_sha else {})}
                for s, w in self.normalized(mix, shards)
            ],
        }

    def souped_weights(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0, shards: Views | None = None) -> dict[str, torch.Tensor]:
        """A CPU copy of the merged UNet weights, in the base's on-disk dtypes."""
        with self.lock:
            self.mix(mix, mode, scale, shards)
            return {
                k: v.detach().to(device="cpu", dtype=checkpoints.torch_dtype(self.base_specs[k][1])).contiguous()
                for k, v in self.hybrid_tensors.items()
            }

    def export(
        self, mix: dict[str, float], out: str | Path, mode: str = "average", scale: float = 1.0, shards: Views | None = None, overwrite: bool = True
    ) -> Path:
        """Write the souped UNet weights as .safetensors, with the recipe in the metadata (atomically)."""
        from safetensors.torch import save_file

        out = Path(out)
        tensors = self.souped_weights(mix, mode, scale, shards)
        metadata = self._merge_metadata(mix, mode, scale, shards)
        with atomic_path(out, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        logger.info("exported %s to %s", metadata["modelspec.title"], out)
        return out

    def _merge_metadata(self, mix: dict[str, float], mode: str, scale: float, shards: Views | None, text_encoders: bool = False) -> dict[str, str]:
        import datetime

        recipe, label = self.recipe(mix, mode, scale, shards, text_encoders=text_encoders), self.label(mix, mode, scale, shards)
        return {
            "format": "pt",
            "soup_ui.recipe": json.dumps(recipe),
            # What A1111's checkpoint merger and SuperMerger read to show a merge's origin.
            "sd_merge_recipe": json.dumps({"type": "diffusion-soup", "label": label, **recipe}),
            "sd_merge_models": json.dumps({s["sha256"]: {"name": s["name"], "weight": s["weight"]} for s in recipe["shards"]}),
            # Stability AI's model spec, which ComfyUI, Forge and the A1111 model browser show.
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "flux-1-schnell" if self.guidance_distilled is False else formats.ARCHITECTURES[self.family],
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": label,
            "modelspec.date": datetime.date.today().isoformat(),
        }

    def export_single_file(
        self, mix: dict[str, float], out: str | Path, mode: str = "average", scale: float = 1.0, shards: Views | None = None, overwrite: bool = True,
        *, text_encoders: bool = False,
    ) -> Path:
        """Write the soup as one fp16 checkpoint in the original LDM naming, UNet + VAE + text encoder
        (the base's, or with `text_encoders` the soup of the shards'), with the merge recipe in its
        metadata: what A1111, Forge and ComfyUI load as a checkpoint."""
        from safetensors.torch import save_file

        if self.family not in formats.LDM_FAMILIES:
            raise StudioError(
                f"a single-file (LDM) export is for SD 1.x, SD 2.x and SDXL; export this {self.family_name} soup as its {self.kind.denoiser} "
                "(diffusers names, which diffusers and ComfyUI load) or as a pipeline folder"
            )
        out = Path(out)
        unet = self.souped_weights(mix, mode, scale, shards)
        metadata = self._merge_metadata(mix, mode, scale, shards, text_encoders)
        with self.lock:
            self._use_text_encoder(self.normalized(mix, shards), mode, scale, text_encoders)
            texts = [getattr(self.pipe, c).state_dict() for c in self.text_components]
            tensors = formats.ldm_checkpoint(unet, self.hybrid.config, self.pipe.vae.state_dict(), self.pipe.vae.config, texts, self.family)
            tensors = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in tensors.items()}
        with atomic_path(out, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        logger.info("exported %s to %s (single file, LDM naming)", metadata["modelspec.title"], out)
        return out

    def pipeline_files(self) -> list[Path]:
        """What a pipeline export copies from the base folder: model_index.json and, in each
        component folder it names (the UNet aside), the configs, tokenizer files and safetensors
        weights; never hidden files, pickles or anything else lying in the folder."""
        base = Path(self.preset.base)
        index = json.loads((base / "model_index.json").read_text())
        keep = {".json", ".txt", ".model", ".safetensors"}
        files = [base / "model_index.json"]
        for component, value in index.items():
            folder = base / component
            if component.startswith("_") or component == self.kind.denoiser or not isinstance(value, list) or not folder.is_dir():
                continue
            files += sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix in keep)
        return files

    def export_pipeline(
        self, mix: dict[str, float], out: str | Path, mode: str = "average", scale: float = 1.0, shards: Views | None = None, overwrite: bool = False,
        *, text_encoders: bool = False,
    ) -> Path:
        """Write a complete diffusers pipeline folder whose UNet is the soup (StableDiffusionPipeline.from_pretrained loads it).

        Written to a temporary folder first, then renamed into place (replacing `out` only with `overwrite`)."""
        import shutil

        out = Path(out)
        if out.exists() and not overwrite:
            raise StudioError(f"{out.name} exists; tick 'overwrite' (--overwrite) to replace it, or choose a new folder")
        self.mix_key(mix, mode, scale, shards)
        base = Path(self.preset.base)
        recipe = json.dumps(self.recipe(mix, mode, scale, shards, text_encoders=text_encoders), indent=2)
        if base.is_file():  # a single-file base: every component is written from memory, the UNet being the soup
            with self.lock:
                self.mix(mix, mode, scale, shards)
                self._use_text_encoder(self.normalized(mix, shards), mode, scale, text_encoders)
                with atomic_path(out, overwrite=True, folder=True) as tmp:
                    self.pipe.save_pretrained(tmp, safe_serialization=True)
                    (tmp / "soup_recipe.json").write_text(recipe)
            return out
        mixed_text = self._text_key(self.normalized(mix, shards), mode, scale, text_encoders) is not None
        with atomic_path(out, overwrite=True, folder=True) as tmp:
            for file in self.pipeline_files():  # everything but the UNet (and mixed text encoders) is the base's, byte for byte
                if mixed_text and file.parent.name in self.text_components and file.suffix == ".safetensors":
                    continue
                target = tmp / file.relative_to(base)
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(file, target)
            denoiser = self.kind.denoiser
            (tmp / denoiser).mkdir()
            shutil.copyfile(base / denoiser / "config.json", tmp / denoiser / "config.json")
            variant = self.variant  # the soup denoiser named like the base's files, so the folder loads as the base did
            self.export(mix, tmp / denoiser / f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors", mode, scale, shards)
            if mixed_text:
                with self.lock:
                    self._use_text_encoder(self.normalized(mix, shards), mode, scale, text_encoders)
                    for component in self.text_components:
                        getattr(self.pipe, component).save_pretrained(tmp / component, safe_serialization=True, variant=variant)
            (tmp / "soup_recipe.json").write_text(recipe)
        return out
