"""The studio engine: a base pipeline, its shard UNets and one preallocated hybrid UNet.

Loading, mixing (via `soup.average_into`), rendering with a shared initial noise, and caching.
No UI here: `ui.py` and `cli.py` call this.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from ..errors import StudioError
from ..maths import methods, soup
from ..maths.methods import warm
from ..modelfiles import checkpoints, families, formats, pngmeta
from ..modelfiles.presets import Preset, Recipe, RenderSettings
from .mix import Mix
from .mixer import Mixer
from .pool import Pool, Shard
from .render import Progress, Rendered, Renderer
from .runtime import RuntimeOptions

logger = logging.getLogger(__name__)


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


class PriorityLock:  # kept by hand: no library lock lets waiting interactive requests go first
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
        self.failed: dict[str, str] = {}  # shard name -> why it was left out
        self.shards: dict[str, Shard] = {}  # the preset's shards (and those added with add_shard)

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
        # The text encoder's floating weights: the base's, or with "text encoders too" a soup of the
        # shards' own, written in place. Integer buffers (position_ids) are never touched.
        self.text_components = [c for c in self.kind.text_encoders if getattr(self.pipe, c, None) is not None]
        self.text_tensors = {
            f"{c}.{n}": p for c in self.text_components for n, p in getattr(self.pipe, c).named_parameters() if p.is_floating_point()
        }
        self.text_specs = {n: (tuple(p.shape), "F32") for n, p in self.text_tensors.items()}
        scheduler_config = dict(self.pipe.scheduler.config)
        if preset.prediction_type is not None:  # e.g. an SD 2.x 512-px (epsilon) single file: the shipped SD 2.x config says v-prediction
            scheduler_config["prediction_type"] = preset.prediction_type
        # Where the base UNet's tensors lie on disk, by diffusers name (a folder's unet/, or mapped from a single file).
        _, self.base_found = formats.base_unet(base, preset.config)
        self.base_specs = self.base_found.specs
        # The base denoiser's memory becomes the hybrid: mixing writes into it, never allocating anew.
        self.hybrid = getattr(self.pipe, self.kind.denoiser).eval()
        self.renderer = Renderer(self.pipe, self.kind, self.family, self.hybrid, self.device, self.dtype, scheduler_config, self.lock, options.cache_size)
        self.preset = preset.model_copy(update={"render": self.renderer.defaults(preset.render)})
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
                         base=lambda: self.base_tensors, on_change=lambda: self.mixer.forget(), order=order)
        self.mixer = Mixer(self.hybrid_tensors, self.text_tensors, self.pool, self.base_found, self.device, self.dtype, self.lock,
                                   lean=lambda: self.lean)
        text_bytes = sum(t.numel() * t.element_size() for t in self.text_tensors.values()) if preset.mix_text_encoders else 0
        self.pool.plan(len(preset.shards), sum(t.numel() * t.element_size() for t in self.hybrid_tensors.values()), text_bytes, options.exporting)
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
        # 3. Compile the soup kernel for the likely shard counts, and the sparse methods' kernels for
        # every shard, in the background (SD-sized UNets only), so that no slider release or first
        # TIES waits 10-40 s for the compiler.
        if options.warm_up and isinstance(self.hybrid_tensors, soup.FlatTensors) and self.hybrid_tensors.buffer.numel() >= soup.WARM_UP_MIN:
            soup.warm_up(range(1, min(len(self.shards), 6) + 1), self.dtype, self.device)
            warm.warm_up_all(min(len(self.shards), 6), self.dtype, self.device)
        report(1.0, "ready")

    # -- the weight pool (pool.py) ------------------------------------------------------------------
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

    # -- shards ---------------------------------------------------------------------------------
    def add_shard(self, name: str, path: str | Path, weight: float = 1.0, description: str = "") -> Shard:
        """Load a shard into the preset's set (the CLI's and every new session's); raises
        CheckpointError and changes nothing on failure."""
        if name in self.shards:
            raise checkpoints.CheckpointError(f"a shard named {name!r} is already loaded")
        shard = Shard(name, self.pool.load(path, name), weight, description)
        with self.lock:
            self.shards[name] = shard
        logger.info("loaded shard %s from %s", name, path)
        return shard

    def remove_shard(self, name: str) -> None:
        with self.lock:
            shard = self.shards.pop(self._known(name, self.shards).name)
        self.pool.release(shard.weights)

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

    def mix(self, mix: Mix) -> str:
        """Merge the mix's shards into the hybrid denoiser in place (mixer.py); returns its label."""
        return self.mixer.merge(mix)

    @property
    def base_tensors(self) -> Mapping[str, torch.Tensor]:
        return self.mixer.base_tensors

    # -- rendering (render.py) -----------------------------------------------------------------------
    def render_component(self, shard: Shard, settings: RenderSettings, *, text_encoders: bool = False) -> Rendered:
        """One shard's image (with its own text encoder, if it has one, under `text_encoders`);
        cached by the shard's content hash and every render setting."""
        alone = Mix.alone(shard, text_encoders)

        def make():
            self.renderer.check(settings)
            if shard.unet is None:  # lean or pinned: the component is the soup of itself alone
                self.mix(alone)
            self.mixer.use_text_encoder(alone)
            return self.renderer.denoise(shard.unet or self.hybrid, [settings], "component", self.mixer.text_mixed)[0]

        with self.lock:
            self.pool.fresh(shard.weights)
            own_text = shard.text_sha if text_encoders else None
            image = self.renderer.cached(("component", shard.sha256, own_text, settings), make)
        recipe = Recipe.of(self.preset.source, alone, settings)
        return Rendered(shard.name, pngmeta.attach(image, recipe, shard.name, shard.sha256[:10]), "component")

    def render_soup(self, mix: Mix, settings: RenderSettings) -> Rendered:
        """The hybrid's image for this mix (with its text encoders when the mix says so); mix and
        render happen under one lock, so concurrent sessions never see each other's weights."""

        def make():
            self.renderer.check(settings)
            self.mix(mix)
            self.mixer.use_text_encoder(mix)
            return self.renderer.denoise(self.hybrid, [settings], "soup", self.mixer.text_mixed)[0]

        with self.lock:
            for s in mix.shards:
                self.pool.fresh(s.weights)
            image = self.renderer.cached(("soup", mix.key, mix.text_key, settings), make)
        label = mix.label + (", text encoders mixed" if mix.text_key else "")
        return Rendered(label, pngmeta.attach(image, Recipe.of(self.preset.source, mix, settings), label, mix.model_hash), "soup")

    def render_soup_batch(self, mix: Mix, batch: list[RenderSettings], batch_size: int = 64) -> list[Image.Image]:
        """The hybrid's images for many prompts and seeds, `batch_size` per denoising pass (for
        evaluations: each equals `render_soup` of its settings up to the rounding of batched maths).
        Not cached; the mix and its renders hold the lock throughout."""
        with self.lock:
            for settings in batch:
                self.renderer.check(settings)
            self.mix(mix)
            self.mixer.use_text_encoder(mix)
            return [im for i in range(0, len(batch), batch_size) for im in self.renderer.denoise(self.hybrid, batch[i : i + batch_size], "soup", self.mixer.text_mixed)]

    def render(self, mix: Mix, settings: RenderSettings, progress: Progress | None = None) -> list[Rendered]:
        """Every component of the mix (in mix order), then the soup, all from the same initial noise.

        The lock is taken per image, so other requests interleave instead of waiting for all of them."""
        report = progress or (lambda f, d: None)
        with self.lock:
            self.renderer.check(settings)
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
            self.renderer.check(settings)
            self.mixer.use_text_encoder(mix)
            return self.renderer.denoise(denoiser, [settings], kind, self.mixer.text_mixed)[0]

    def render_ensemble(self, mix: Mix, settings: RenderSettings) -> tuple[Rendered, Rendered]:
        """The output-space ensemble of the mix's shards and the soup (workflows.ensemble); a routed
        studio has its render workers make it."""
        from . import workflows

        return workflows.ensemble(self, mix, settings)

    def export(self, kind: str, mix: Mix, out: str | Path, overwrite: bool = False) -> Path:
        """Write the soup: "unet" (the denoiser in diffusers names), "single-file" (one fp16 LDM
        checkpoint for A1111, Forge and ComfyUI) or "pipeline" (a diffusers folder), with the recipe in
        the metadata (exports.py); a routed studio has its render workers write it."""
        from . import exports

        write = {"unet": exports.denoiser_file, "single-file": exports.single_file, "pipeline": exports.pipeline_folder}.get(kind)
        if write is None:
            raise StudioError(f"export kind {kind!r}: choose unet, single-file or pipeline")
        return write(self, mix, out, overwrite)

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
            self.mixer.use_text_encoder(mix)
            return [{k: v.detach().cpu().clone() for k, v in getattr(self.pipe, c).state_dict().items()} for c in self.text_components]

    @contextmanager
    def holding(self, mix: Mix):
        """The pipeline with this mix in its denoiser and text encoders, held under the lock (exports)."""
        with self.lock:
            self.mix(mix)
            self.mixer.use_text_encoder(mix)
            yield self.pipe
