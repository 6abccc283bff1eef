"""Rendering: prompt embeddings, the shared initial noise, the denoising loop and the image cache.

A `Renderer` runs one loaded diffusers pipeline with whichever denoiser it is handed (the hybrid,
a component's own, the ensemble's), so that every image of a render starts from the same noise and
differs only by its weights. It knows nothing of shards or mixes; the studio decides what is in
the denoiser and the text encoder, and keys the images it caches here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from cachetools import LRUCache
from PIL import Image

from ..errors import StudioError
from ..maths import soup
from ..modelfiles import families
from ..modelfiles.presets import SCHEDULERS, RenderDefaults, RenderSettings

Progress = Callable[[float, str], None]


@dataclass
class Rendered:
    """One labelled image of a render."""

    label: str
    image: Image.Image
    kind: str  # "component", "soup" or "ensemble"
    info: dict = field(default_factory=dict)  # measurements shown with the image (distances, t, ...)


class Renderer:
    """Denoises with the base pipeline's scheduler, text encoders and VAE, and caches images.

    `lock` is the studio's: the pipeline and its text encoder are shared, so every denoising pass and
    every cache lookup that may render runs under it."""

    def __init__(self, pipe, kind: families.Family, family: str, hybrid: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype, scheduler_config: dict, lock, cache_size: int):
        self.pipe, self.kind, self.family, self.hybrid = pipe, kind, family, hybrid
        self.device, self.dtype, self.lock = device, dtype, lock
        self.scheduler_config = scheduler_config
        self.base_scheduler = type(pipe.scheduler)  # the "default" scheduler
        self.images: LRUCache = LRUCache(cache_size)
        self.embeddings_cache: LRUCache = LRUCache(64)  # by text encoder and prompts
        self.renders: Counter[str] = Counter()  # denoising runs by kind, for tests and benchmarks

    # -- what the family renders with ---------------------------------------------------------------
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

    def defaults(self, render: RenderDefaults) -> RenderDefaults:
        """A preset's render settings where it sets them, else the family's: the denoiser's native
        size, and steps, guidance and scheduler (FLUX.1 schnell: 4 steps, no guidance)."""
        native = self.pipe.vae_scale_factor * (self.hybrid.config.get("sample_size") or getattr(self.pipe, "default_sample_size", 128))
        family = {"height": native, "width": native, **self.kind.defaults}
        if self.guidance_distilled is False:
            family.update(steps=4, guidance_scale=0.0)
        return render.model_copy(update={k: v for k, v in family.items() if k not in render.model_fields_set})

    def check(self, settings: RenderSettings) -> None:
        """StudioError naming what this model cannot render: a scheduler or a negative prompt it has
        no use for, a prompt longer than its tokenizer reads."""
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

    # -- the parts of one image -----------------------------------------------------------------------
    def embeddings(self, settings: RenderSettings, text_key) -> dict[str, torch.Tensor]:
        """The pipeline's prompt embeddings, by the pipeline's argument names (pooled ones for SDXL, SD3
        and FLUX; negative ones where classifier-free guidance applies), cached per text encoder
        (`text_key`: what the text encoder holds now)."""
        key = (text_key, settings.prompt, settings.negative_prompt)
        cached = self.embeddings_cache.get(key)
        if cached is None:
            extra = dict(self.kind.encode_args)
            if self.kind.negative_prompt:
                extra.update(do_classifier_free_guidance=True, negative_prompt=settings.negative_prompt)
            if self.kind.max_tokens:
                extra["max_sequence_length"] = self.kind.max_tokens  # the pipeline's default, stated
            out = self.pipe.encode_prompt(prompt=settings.prompt, device=self.device, num_images_per_prompt=1, **extra)
            cached = {name: value for name, value in zip(self.kind.embeddings, out) if name}
            self.embeddings_cache[key] = cached
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

    def denoise(self, denoiser: torch.nn.Module, batch: list[RenderSettings], kind: str, text_key) -> list[Image.Image]:
        """One denoising pass over a batch of prompts and seeds (steps, guidance, size and scheduler
        shared) with `denoiser` in the pipeline's place; each image starts from its own seed's noise,
        as if rendered alone. Never while a soup kernel compiles in the background (`soup.TRACING`)."""
        import diffusers

        settings = batch[0]
        shared = {"prompt", "negative_prompt", "seed"}
        if any(s.model_dump(exclude=shared) != settings.model_dump(exclude=shared) for s in batch):
            raise StudioError("a batched render needs the same steps, guidance, size and scheduler for every image")
        scheduler = SCHEDULERS[settings.scheduler]
        scheduler_cls = getattr(diffusers, scheduler) if scheduler else self.base_scheduler
        with soup.TRACING:
            embeds = [self.embeddings(s, text_key) for s in batch]
            setattr(self.pipe, self.kind.denoiser, denoiser)
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
            image = self.images.get(key)
            if image is None:
                image = make()
                self.images[key] = image
        return image
