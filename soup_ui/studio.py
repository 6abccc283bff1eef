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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import checkpoints, soup
from .presets import SCHEDULERS, Preset, RenderSettings

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


@dataclass
class Shard:
    """A loaded specialist: its UNet on the device and what identifies its weights."""

    name: str
    path: Path
    sha256: str
    unet: torch.nn.Module | None  # None in lean mode: the weights stay in their files
    weight: float = 1.0
    description: str = ""
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)


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


class Studio:
    """Holds one preset's models and renders components and soups of them."""

    def __init__(self, preset: Preset, options: RuntimeOptions = RuntimeOptions(), progress: Progress | None = None):
        from diffusers import StableDiffusionPipeline

        self.preset = preset
        self.options = options
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(self.device, options.dtype)
        self.lock = threading.RLock()  # one mix+render at a time: the hybrid UNet is shared
        self.renders: Counter[str] = Counter()  # UNet denoising runs by kind, for tests and benchmarks
        self.failed: dict[str, str] = {}  # shard name -> why it was left out
        self.shards: dict[str, Shard] = {}
        self._images = LRU(options.cache_size)
        self._text = LRU(64)
        self._mixed: tuple | None = None
        self._base_tensors: Mapping[str, torch.Tensor] | None = None

        # 1. The base pipeline: tokenizer, text encoder, VAE and scheduler are shared by all shards.
        report = progress or (lambda f, d: None)
        report(0.0, "loading base pipeline")
        try:
            self.pipe = StableDiffusionPipeline.from_pretrained(
                preset.base,
                dtype=self.dtype,
                use_safetensors=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            ).to(self.device)
        except (OSError, ValueError, EnvironmentError) as err:
            raise StudioError(f"{preset.base}: cannot load the base pipeline ({err})") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = self.pipe.scheduler.config
        self.base_specs = checkpoints.tensor_specs(Path(preset.base) / "unet")
        # The base UNet's memory becomes the hybrid: mixing writes into it, never allocating anew.
        self.hybrid = self.pipe.unet.eval()
        self.hybrid_tensors = soup.flatten_module(self.hybrid)  # one buffer: the soup is one pass
        unet_bytes = sum(t.numel() * t.element_size() for t in self.hybrid_tensors.values())
        self.lean = options.lean if options.lean is not None else len(preset.shards) * unet_bytes > 0.8 * free_memory(self.device)
        if self.lean:
            logger.info("lean mode: %d shards of %.0f MB are streamed from their files", len(preset.shards), unet_bytes / 1e6)

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
        report(1.0, "ready")

    # -- shards ---------------------------------------------------------------------------------
    def add_shard(self, name: str, path: str | Path, weight: float = 1.0, description: str = "") -> Shard:
        """Validate a UNet against the base and load it; raises CheckpointError and changes nothing on failure."""
        if name in self.shards:
            raise checkpoints.CheckpointError(f"a shard named {name!r} is already loaded")
        checkpoints.compare_specs(name, checkpoints.tensor_specs(path), self.base_specs)
        if self.lean:
            lazy = checkpoints.LazyWeights(path, self.device, self.dtype)
            checkpoints.check_finite(path, lazy)
            shard = Shard(name, Path(path), checkpoints.sha256_file(path), None, weight, description, lazy)
        else:
            unet = copy.deepcopy(self.hybrid)
            unet.load_state_dict(checkpoints.load_weights(path, self.device, self.dtype), strict=True)
            shard = Shard(name, Path(path), checkpoints.sha256_file(path), unet, weight, description)
            shard.tensors = soup.flatten_module(unet)
        with self.lock:
            self.shards[name] = shard
        logger.info("loaded shard %s from %s", name, path)
        return shard

    def remove_shard(self, name: str) -> None:
        with self.lock:
            if self.shards.pop(self._known(name).name, None) is not None:
                self._mixed = None

    def _known(self, name: str) -> Shard:
        shard = self.shards.get(name)
        if shard is None:
            known = ", ".join(self.shards) or "none"
            raise StudioError(f"unknown shard {name!r} (loaded: {known})")
        return shard

    # -- the soup -------------------------------------------------------------------------------
    def normalized(self, mix: dict[str, float]) -> list[tuple[Shard, float]]:
        """Check a {shard name: weight} mix and normalize its weights; raises StudioError."""
        shards = [self._known(n) for n in mix]
        try:
            weights = soup.normalize_weights(list(mix.values()), list(mix))
        except ValueError as err:
            raise StudioError(str(err)) from None
        return list(zip(shards, weights))

    def mix_key(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0) -> tuple:
        """What identifies a soup's weights: shard contents, normalized weights, mode and scale."""
        pairs = self.normalized(mix)
        if mode not in soup.MERGE_MODES:
            raise StudioError(f"unknown merge mode {mode!r} (known: {', '.join(soup.MERGE_MODES)})")
        if not math.isfinite(scale) or not 0 <= scale <= 10:
            raise StudioError(f"scale must be between 0 and 10, got {scale}")
        return (mode, scale if mode != "average" else 1.0, tuple((s.sha256, round(w, 12)) for s, w in pairs))

    def label(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0) -> str:
        pairs = self.normalized(mix)
        return soup.mixture_label([s.name for s, _ in pairs], [w for _, w in pairs], mode, scale)

    def mix(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0) -> str:
        """Merge the selected shards into the hybrid UNet in place; returns the recipe label.

        Skipped when the hybrid already holds this mix (same shards, normalized weights, mode)."""
        key = self.mix_key(mix, mode, scale)
        pairs = self.normalized(mix)
        with self.lock:
            if key != self._mixed:
                base = self.base_tensors if soup.MERGE_MODES[mode].needs_base else None
                self._mixed = None  # if merging fails half way, the hybrid is not this mix
                soup.merge_into(mode, self.hybrid_tensors, [s.tensors for s, _ in pairs], [w for _, w in pairs], base, scale)
                self._mixed = key
        return self.label(mix, mode, scale)

    @property
    def base_tensors(self) -> Mapping[str, torch.Tensor]:
        """The base UNet's weights, read on demand from its files (the hybrid overwrote them in memory)."""
        if self._base_tensors is None:
            self._base_tensors = checkpoints.LazyWeights(Path(self.preset.base) / "unet", self.device, self.dtype)
        return self._base_tensors

    # -- rendering ------------------------------------------------------------------------------
    def check_settings(self, settings: RenderSettings) -> None:
        limit = self.pipe.tokenizer.model_max_length
        for label, text in (("prompt", settings.prompt), ("negative prompt", settings.negative_prompt)):
            n = len(self.pipe.tokenizer(text).input_ids)
            if n > limit:
                raise StudioError(f"the {label} is {n} tokens long; this model reads at most {limit} (shorten it)")

    def _embeddings(self, settings: RenderSettings):
        key = (settings.prompt, settings.negative_prompt)
        cached = self._text.hit(key)
        if cached is None:
            cached = self.pipe.encode_prompt(
                settings.prompt, self.device, 1, True, negative_prompt=settings.negative_prompt
            )
            self._text.put(key, cached)
        return cached

    def initial_noise(self, settings: RenderSettings) -> torch.Tensor:
        """The same starting latents for every image of a render, from the seed alone."""
        factor = self.pipe.vae_scale_factor
        shape = (1, self.hybrid.config.in_channels, settings.height // factor, settings.width // factor)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)

    def _denoise(self, unet: torch.nn.Module, settings: RenderSettings, kind: str) -> Image.Image:
        import diffusers

        scheduler_cls = getattr(diffusers, SCHEDULERS[settings.scheduler])
        prompt_embeds, negative_embeds = self._embeddings(settings)
        self.pipe.unet = unet
        self.pipe.scheduler = scheduler_cls.from_config(self.scheduler_config)
        try:
            out = self.pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                latents=self.initial_noise(settings),
                output_type="pil",
            )
        finally:
            self.pipe.unet = self.hybrid
        self.renders[kind] += 1
        return out.images[0]

    def render_component(self, name: str, settings: RenderSettings) -> Rendered:
        """One shard's image; cached by the shard's content hash and every render setting."""
        shard = self._known(name)
        key = ("component", shard.sha256, settings)
        with self.lock:
            image = self._images.hit(key)
            if image is None:
                self.check_settings(settings)
                if shard.unet is None:  # lean mode: the component is the soup of itself alone
                    self.mix({name: 1.0})
                image = self._denoise(shard.unet or self.hybrid, settings, "component")
                self._images.put(key, image)
        return Rendered(name, image, "component")

    def render_soup(self, mix: dict[str, float], settings: RenderSettings, mode: str = "average", scale: float = 1.0) -> Rendered:
        """The hybrid's image for this mix; mix and render happen under one lock, so concurrent
        sessions never see each other's weights."""
        key = ("soup", self.mix_key(mix, mode, scale), settings)
        with self.lock:
            image = self._images.hit(key)
            if image is None:
                self.check_settings(settings)
                self.mix(mix, mode, scale)
                image = self._denoise(self.hybrid, settings, "soup")
                self._images.put(key, image)
        return Rendered(self.label(mix, mode, scale), image, "soup")

    def render(
        self, mix: dict[str, float], settings: RenderSettings, progress: Progress | None = None, mode: str = "average", scale: float = 1.0
    ) -> list[Rendered]:
        """Every selected component (in mix order), then the soup, all from the same initial noise."""
        report = progress or (lambda f, d: None)
        self.mix_key(mix, mode, scale)  # fail before any work
        self.check_settings(settings)
        out = []
        for i, name in enumerate(mix):
            report(i / (len(mix) + 1), f"rendering {name}")
            out.append(self.render_component(name, settings))
        report(len(mix) / (len(mix) + 1), "rendering the soup")
        out.append(self.render_soup(mix, settings, mode, scale))
        report(1.0, "done")
        return out

    # -- export ---------------------------------------------------------------------------------
    def recipe(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0) -> dict:
        """Where a soup comes from: mode, scale, and each shard's name, content hash and weight."""
        self.mix_key(mix, mode, scale)
        return {
            "mode": mode,
            "scale": scale,
            "shards": [{"name": s.name, "sha256": s.sha256, "weight": w} for s, w in self.normalized(mix)],
        }

    def souped_weights(self, mix: dict[str, float], mode: str = "average", scale: float = 1.0) -> dict[str, torch.Tensor]:
        """A CPU copy of the merged UNet weights, in the base's on-disk dtypes."""
        with self.lock:
            self.mix(mix, mode, scale)
            return {
                k: v.detach().to(device="cpu", dtype=checkpoints.torch_dtype(self.base_specs[k][1])).contiguous()
                for k, v in self.hybrid_tensors.items()
            }

    def export(self, mix: dict[str, float], out: str | Path, mode: str = "average", scale: float = 1.0) -> Path:
        """Write the souped UNet weights as .safetensors, with the recipe in the metadata (atomically)."""
        from safetensors.torch import save_file

        out = Path(out)
        recipe, label = self.recipe(mix, mode, scale), self.label(mix, mode, scale)
        tensors = self.souped_weights(mix, mode, scale)
        metadata = {
            "format": "pt",
            "soup_ui.recipe": json.dumps(recipe),
            # What A1111's checkpoint merger and SuperMerger read to show a merge's origin.
            "sd_merge_recipe": json.dumps({"type": "diffusion-soup", "label": label, **recipe}),
            "sd_merge_models": json.dumps({s["sha256"]: {"name": s["name"], "weight": s["weight"]} for s in recipe["shards"]}),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(out)
        logger.info("exported %s to %s", label, out)
        return out

    def export_pipeline(self, mix: dict[str, float], out: str | Path, mode: str = "average", scale: float = 1.0) -> Path:
        """Write a complete diffusers pipeline folder whose UNet is the soup (StableDiffusionPipeline.from_pretrained loads it).

        Written to a temporary folder first, then renamed into place."""
        import shutil
        import tempfile

        out = Path(out)
        if out.exists():
            raise StudioError(f"{out} exists; choose a new folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            base = Path(self.preset.base)
            for item in base.iterdir():  # everything but the UNet is the base's, byte for byte
                if item.name != "unet":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            (tmp / "unet").mkdir()
            shutil.copy2(base / "unet" / "config.json", tmp / "unet" / "config.json")
            self.export(mix, tmp / "unet" / "diffusion_pytorch_model.safetensors", mode, scale)
            (tmp / "soup_recipe.json").write_text(json.dumps(self.recipe(mix, mode, scale), indent=2))
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out
