"""The studio engine: a base pipeline, its shard UNets and one preallocated hybrid UNet.

Loading, mixing (via `soup.average_into`), rendering with a shared initial noise, and caching.
No UI here: `ui.py` and `cli.py` call this.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import adapters, checkpoints, families, formats, methods, pngmeta, soup
from .errors import StudioError
from .mix import Mix
from .pool import Pool, Shard, Weights
from .presets import SCHEDULERS, Preset, Recipe, RenderDefaults, RenderSettings

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how models run; kept apart from presets and recipes."""

    device: str | None = None  # None: cuda if available, else mps, else cpu
    dtype: str | None = None  # None: float16 on GPU, float32 on CPU (fp16 maths is slow on CPUs)
    cache_size: int = 512  # rendered images kept in memory
    lean: bool | None = None  # stream shards from memory-mapped files; None: when they would not fit
    memory: str | None = None  # force where shards live: "resident", "pinned" or "lean" (None: planned, see Studio.plan_memory)
    warm_up: bool = True  # compile the soup kernel in the background at start (off where this Studio never merges: a page with render workers)


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

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    put = __setitem__

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
        self._images = LRU(options.cache_size)
        self._text = LRU(64)
        self._mixed: tuple | None = None
        self._base_tensors: Mapping[str, torch.Tensor] | None = None
        self._stats = LRU(1 << 18)  # merge methods' per-shard statistics that no weight changes (TIES' thresholds), by shard hash and tensor
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
        # The denoiser's blocks (block weights), and one buffer laid out block by block: a soup is one
        # pass, a block-weighted soup one range per block.
        try:
            self.blocks: families.Blocks | None = families.block_map(self.family, self.hybrid.config, self.hybrid.state_dict())
        except (ValueError, KeyError, checkpoints.CheckpointError) as err:
            self.blocks = None
            logger.warning("block weights unavailable for this denoiser: %s", err)
        order = self.blocks.order(self.hybrid.state_dict()) if self.blocks is not None else None
        self.hybrid_tensors = soup.flatten_module(self.hybrid, order)
        self.pool = Pool(self.device, self.dtype, self.lock, options, self.hybrid, self.base_specs, self.text_specs,
                         base=lambda: self.base_tensors, on_change=self._forget_mix, order=order)
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
        if options.warm_up and isinstance(self.hybrid_tensors, soup.FlatTensors) and self.hybrid_tensors.buffer.numel() >= soup.WARM_UP_MIN:
            soup.warm_up(range(1, min(len(self.shards), 6) + 1), self.dtype, self.device)
        report(1.0, "ready")

    def _forget_mix(self) -> None:
        self._mixed = None  # pooled weights changed: the hybrid no longer holds a known mix

    # -- the weight pool (pool.py) ------------------------------------------------------------------
    def plan_memory(self, count: int, unet_bytes: int) -> None:
        """Where shards live, and why (see Pool.plan)."""
        self.pool.plan(count, unet_bytes)

    @property
    def memory_plan(self) -> str:
        return self.pool.memory_plan

    @property
    def lean(self) -> bool:
        return self.pool.lean

    @property
    def runs_on(self) -> str:
        """Where its images are rendered, as the page's header says it: "cuda, float16"."""
        return f"{self.device}, {str(self.dtype).removeprefix('torch.')}"

    def load(self, path: str | Path, name: str | None = None) -> Weights:
        """Detect, validate and pool a checkpoint's weights; the caller holds one use (see Pool.load)."""
        return self.pool.load(path, name)

    def release(self, weights: Weights) -> None:
        self.pool.release(weights)

    @property
    def pooled(self) -> int:
        """How many distinct weights are loaded."""
        return len(self.pool)

    def _fresh(self, weights: Weights) -> None:
        self.pool.fresh(weights)

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
    def make_mix(
        self, weights: Mapping[str, float], method: str = "average", params: Mapping | methods.Params | None = None,
        shards: Views | None = None, *, text_encoders: bool = False, blocks: Mapping[str, object] | None = None,
    ) -> Mix:
        """A `Mix` of `weights` ({shard name: weight}) over `shards` (a session's view; default: the
        preset's), with `blocks` ({shard name: block multipliers}, see families.Blocks.parse), validated
        and normalized once; StudioError naming what is wrong."""
        return Mix.build(self.shards if shards is None else shards, weights, method, params, text_encoders, blocks, self.blocks)

    @torch.no_grad()
    def _add_lora(self, sources: list[Mapping[str, torch.Tensor]], coefficients: Mapping[str, list[float]], loras: list[tuple[int, dict[str, adapters.Adapter]]]) -> None:
        """Each weight an adapter changes, computed again in float32 and rounded once: sum_i c_i
        source_i + sum_j c_j * delta_j(base) (e.g. scale_j * up_j @ down_j; the rest of the merge is
        untouched). `coefficients`: per tensor, one per source (its block's, with block weights);
        `loras`: (the LoRA shard's source index, its adapters)."""
        for key in {k for _, lora in loras for k in lora}:
            tensor = self.hybrid_tensors[key]
            total = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
            cs = coefficients[key]
            for source, c in zip(sources, cs):
                if c:
                    total += c * source[key].float()
            for i, lora in loras:
                if key in lora and cs[i]:
                    total += cs[i] * lora[key].delta(self.base_tensors[key]).to(tensor.device)
            tensor.copy_(total)

    @torch.no_grad()
    def _use_text_encoder(self, mix: Mix) -> tuple | None:
        """Make the pipeline's text encoder the one this mix renders with (the base's, or the merge of
        the shards' own with the mix's weights and method, a shard without one counting as the base);
        in place, summed in float32 and rounded once. Call under the lock; returns its key."""
        key = mix.text_key
        if key == self._text_mixed:
            return key
        if self._base_text is None:
            self._base_text = {n: t.detach().clone() for n, t in self.text_tensors.items()}
        self._text_mixed = ("changing",)  # if mixing fails half way, the text encoder is no known mix
        if key is None:
            for name, tensor in self.text_tensors.items():
                tensor.copy_(self._base_text[name])
        else:
            sources = [self.pool.text_encoder_of(s.weights) if s.weights.text_found is not None else self._base_text for s in mix.shards]
            base = self._base_text if mix.method.needs_base else None
            methods.merge_into(self.text_tensors, mix.method, mix.params, sources, mix.text_weights, base)
        self._text_mixed = key
        return key

    def mix(self, mix: Mix) -> str:
        """Merge the mix's shards into the hybrid denoiser in place; returns its label.

        Skipped when the hybrid already holds this mix (same shards, weights, method and parameters)."""
        with self.lock:
            for s in mix.shards:
                self._fresh(s.weights)  # before the key: a rewritten lean file changes its hash
            key = mix.key
            if key != self._mixed:
                parts = mix.parts()  # block weights: one part per block
                needs_base = mix.method.needs_base or any(p.weights is None for p in parts or ())
                base = self.base_tensors if needs_base else None
                self._mixed = None  # if merging fails half way, the hybrid is not this mix
                if mix.method.linear:
                    # A LoRA shard is base + delta: the base stands in for it in the linear merge, and
                    # its low-rank delta, times the coefficient the method gives that shard, is added after.
                    sources = [self.base_tensors if s.weights.lora is not None else s.tensors for s in mix.shards]
                    methods.merge_into(self.hybrid_tensors, mix.method, mix.params, sources, mix.weights, base, parts=parts)
                    loras = [(i, s.weights.lora) for i, s in enumerate(mix.shards) if s.weights.lora is not None]
                    if loras:
                        self._add_lora([*sources, self.base_tensors], self._coefficients(mix, parts, {k for _, lora in loras for k in lora}), loras)
                else:  # tensor by tensor; a LoRA shard's full weights are made one tensor at a time (LoraTensors)
                    methods.merge_into(self.hybrid_tensors, mix.method, mix.params, [s.tensors for s in mix.shards], mix.weights, base, parts=parts,
                                       memo=self._stats, keys=[s.sha256 for s in mix.shards])
                self._mixed = key
        return mix.label

    @staticmethod
    def _coefficients(mix: Mix, parts: list[methods.Part] | None, keys) -> dict[str, list[float]]:
        """A linear mix's coefficients for each of `keys`: one per shard, then the base's."""
        part_of = {n: p for p in parts for n in p.names} if parts else {}
        out = {}
        for key in keys:
            part = part_of.get(key)
            if part is not None and part.weights is None:
                out[key] = [0.0] * len(mix.shards) + [1.0]
                continue
            coefficients, base_coefficient = mix.method.coefficients(list(part.weights if part else mix.weights), part.params if part else mix.params)
            out[key] = [*coefficients, base_coefficient]
        return out

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

    def render_component(self, shard: Shard, settings: RenderSettings, *, text_encoders: bool = False) -> Rendered:
        """One shard's image (with its own text encoder, if it has one, under `text_encoders`);
        cached by the shard's content hash and every render setting."""
        alone = Mix.alone(shard, text_encoders)

        def make():
            self.check_settings(settings)
            if shard.unet is None:  # lean or pinned: the component is the soup of itself alone
                self.mix(alone)
            self._use_text_encoder(alone)
            return self._denoise(shard.unet or self.hybrid, settings, "component")

        with self.lock:
            self._fresh(shard.weights)
            own_text = shard.text_sha if text_encoders else None
            image = self.cached(("component", shard.sha256, own_text, settings), make)
        recipe = Recipe.of(self.preset.source, alone, settings)
        return Rendered(shard.name, pngmeta.attach(image, recipe, shard.name, shard.sha256[:10]), "component")

    def render_soup(self, mix: Mix, settings: RenderSettings) -> Rendered:
        """The hybrid's image for this mix (with its text encoders when the mix says so); mix and
        render happen under one lock, so concurrent sessions never see each other's weights."""

        def make():
            self.check_settings(settings)
            self.mix(mix)
            self._use_text_encoder(mix)
            return self._denoise(self.hybrid, settings, "soup")

        with self.lock:
            for s in mix.shards:
                self._fresh(s.weights)
            image = self.cached(("soup", mix.key, mix.text_key, settings), make)
        label = mix.label + (", text encoders mixed" if mix.text_key else "")
        return Rendered(label, pngmeta.attach(image, Recipe.of(self.preset.source, mix, settings), label), "soup")

    def render_soup_batch(self, mix: Mix, batch: list[RenderSettings], batch_size: int = 64) -> list[Image.Image]:
        """The hybrid's images for many prompts and seeds, `batch_size` per denoising pass (for
        evaluations: each equals `render_soup` of its settings up to the rounding of batched maths).
        Not cached; the mix and its renders hold the lock throughout."""
        with self.lock:
            for settings in batch:
                self.check_settings(settings)
            self.mix(mix)
            self._use_text_encoder(mix)
            return [im for i in range(0, len(batch), batch_size) for im in self._denoise_many(self.hybrid, batch[i : i + batch_size], "soup")]

    def render(self, mix: Mix, settings: RenderSettings, progress: Progress | None = None) -> list[Rendered]:
        """Every component of the mix (in mix order), then the soup, all from the same initial noise.

        The lock is taken per image, so other requests interleave instead of waiting for all of them."""
        report = progress or (lambda f, d: None)
        with self.lock:
            self.check_settings(settings)
        out = []
        count = len(mix.shards)
        for i, shard in enumerate(mix.shards):
            report(i / (count + 1), f"rendering {shard.name}")
            out.append(self.render_component(shard, settings, text_encoders=mix.text_encoders))
        report(count / (count + 1), "rendering the soup")
        out.append(self.render_soup(mix, settings))
        report(1.0, "done")
        return out

    def denoise(self, denoiser: torch.nn.Module, settings: RenderSettings, kind: str, mix: Mix) -> Image.Image:
        """One image with another denoiser in the pipeline's place (the ensemble reference) and the
        mix's text encoder, from the render's shared initial noise."""
        with self.lock:
            self.check_settings(settings)
            self._use_text_encoder(mix)
            return self._denoise(denoiser, settings, kind)

    @torch.no_grad()
    def base_denoiser(self) -> torch.nn.Module:
        """A copy of the base's denoiser (the hybrid's memory holds merges), for the ensemble reference."""
        with self.lock:
            module = copy.deepcopy(self.hybrid)
            base = self.base_tensors
            module.load_state_dict({k: base[k] for k in module.state_dict()}, strict=True)
        return module

    def souped_weights(self, mix: Mix) -> dict[str, torch.Tensor]:
        """A CPU copy of the merged denoiser weights, in the base's on-disk dtypes."""
        with self.lock:
            self.mix(mix)
            return {
                k: v.detach().to(device="cpu", dtype=checkpoints.torch_dtype(self.base_specs[k][1])).contiguous()
                for k, v in self.hybrid_tensors.items()
            }

    def text_state(self, mix: Mix) -> list[dict[str, torch.Tensor]]:
        """The text encoders' state dicts as this mix renders with them (the base's or mixed)."""
        with self.lock:
            self._use_text_encoder(mix)
            return [{k: v.detach().cpu().clone() for k, v in getattr(self.pipe, c).state_dict().items()} for c in self.text_components]

    @contextmanager
    def holding(self, mix: Mix):
        """The pipeline with this mix in its denoiser and text encoders, held under the lock (exports)."""
        with self.lock:
            self.mix(mix)
            self._use_text_encoder(mix)
            yield self.pipe
