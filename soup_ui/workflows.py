"""The paper's experiments as studio workflows: leave-one-out, interpolation, grids, and the
geometric-mean (ensemble) reference. Each takes a Studio and returns labelled images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from . import soup
from .presets import RenderSettings
from .studio import Progress, Rendered, Studio, StudioError, Views

logger = logging.getLogger(__name__)


def pixel_distance(a, b) -> float:
    """Mean absolute difference of two images, in 0-255 pixel levels."""
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def _weights(studio: Studio, mix: dict[str, float], names: Sequence[str], shards: Views | None = None) -> list[float]:
    normalized = {s.name: w for s, w in studio.normalized(mix, shards)}
    return [normalized.get(n, 0.0) for n in names]


@torch.no_grad()
def leave_one_out(
    studio: Studio, mix: dict[str, float], settings: RenderSettings, progress: Progress | None = None, shards: Views | None = None
) -> list[Rendered]:
    """The full soup, then the soup without each shard in turn (the paper's Fig. 4 unlearning
    experiment, as pictures); each labelled with how far it moved from the full soup, in pixels and
    in weight space (RMS parameter difference). Runs at background priority, image by image."""
    with studio.lock.background():
        return _leave_one_out(studio, mix, settings, progress, shards)


def _leave_one_out(studio, mix, settings, progress, view) -> list[Rendered]:
    report = progress or (lambda f, d: None)
    names = list(mix)
    if len([n for n in names if mix[n] > 0]) < 2:
        raise StudioError("leave-one-out needs at least two shards with positive weight")
    full = studio.render_soup(mix, settings, shards=view)
    shards = [studio._known(n, view).tensors for n in names]
    full_w = _weights(studio, mix, names, view)
    out = [Rendered(f"full {full.label}", full.image, "soup", {"pixels": 0.0, "weights": 0.0})]
    for i, name in enumerate(names):
        report((i + 1) / (len(names) + 1), f"soup without {name}")
        rest = {n: w for n, w in mix.items() if n != name}
        if sum(rest.values()) <= 0:
            continue
        image = studio.render_soup(rest, settings, shards=view).image
        rest_w = _weights(studio, rest, names, view)
        dw = soup.weight_distance(shards, [a - b for a, b in zip(full_w, rest_w)])
        dp = pixel_distance(full.image, image)
        out.append(Rendered(f"without {name}: {dp:.1f} px, {dw:.2e} weights", image, "soup", {"without": name, "pixels": dp, "weights": dw}))
    report(1.0, "done")
    return out


def interpolate(
    studio: Studio,
    start: dict[str, float],
    end: dict[str, float],
    steps: int,
    settings: RenderSettings,
    progress: Progress | None = None,
    shards: Views | None = None,
) -> list[Rendered]:
    """Soups along the line from mix `start` (t=0) to mix `end` (t=1): the paper's hybrid-style strip.

    A shard alone is the mix {name: 1}; the current soup is its own mix. Runs at background priority."""
    if not 2 <= steps <= 32:
        raise StudioError(f"interpolation steps must be between 2 and 32, got {steps}")
    names = list(dict.fromkeys([*start, *end]))
    a, b = _weights(studio, start, names, shards), _weights(studio, end, names, shards)
    if a == b:
        raise StudioError("the two ends of the interpolation are the same mix: every image would be the same soup")
    report = progress or (lambda f, d: None)
    out = []
    with studio.lock.background():
        for i in range(steps):
            t = i / (steps - 1)
            report(i / steps, f"t = {t:.2f}")
            mix = {n: (1 - t) * wa + t * wb for n, wa, wb in zip(names, a, b)}
            r = studio.render_soup(mix, settings, shards=shards)
            out.append(Rendered(f"t={t:.2f}: {r.label}", r.image, "soup", {"t": t}))
    report(1.0, "done")
    return out


AXES = ("weight", "seed", "prompt", "guidance", "steps")


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: what varies (`kind`, and `shard` for a weight axis) and its values."""

    kind: str
    values: tuple
    shard: str | None = None

    def __post_init__(self):
        if self.kind not in AXES:
            raise StudioError(f"grid axis must be one of {', '.join(AXES)}, got {self.kind!r}")
        if self.kind == "weight" and not self.shard:
            raise StudioError("a weight axis names its shard, e.g. weight:twemoji=0,0.5,1")
        if not 1 <= len(self.values) <= 16:
            raise StudioError(f"a grid axis has 1 to 16 values, got {len(self.values)}")

    @classmethod
    def parse(cls, text: str) -> "Axis":
        """"seed=0,1,2", "weight:twemoji=0,0.5,1", "prompt=a cat|a dog", "guidance=1,4", "steps=5,20"."""
        head, sep, values = text.partition("=")
        if not sep:
            raise StudioError(f"grid axis {text!r} must look like KIND=V1,V2 (kinds: {', '.join(AXES)})")
        kind, _, shard = head.partition(":")
        parts = values.split("|") if kind == "prompt" else values.split(",")
        try:
            cast = {"weight": float, "seed": int, "guidance": float, "steps": int, "prompt": str}[kind]
        except KeyError:
            raise StudioError(f"grid axis must be one of {', '.join(AXES)}, got {kind!r}") from None
        try:
            return cls(kind, tuple(cast(p.strip()) for p in parts if p.strip()), shard or None)
        except ValueError as err:
            raise StudioError(f"grid axis {text!r}: {err}") from None

    def label(self, value) -> str:
        return f"{self.shard}={value:g}" if self.kind == "weight" else f"{self.kind}={value}"

    def apply(self, value, mix: dict[str, float], settings: RenderSettings) -> tuple[dict[str, float], RenderSettings]:
        if self.kind == "weight":
            return {**mix, self.shard: float(value)}, settings
        field = {"seed": "seed", "prompt": "prompt", "guidance": "guidance_scale", "steps": "steps"}[self.kind]
        try:
            return mix, RenderSettings(**{**settings.model_dump(), field: value})
        except ValidationError as err:
            problem = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise StudioError(f"grid axis {self.kind}: {self.label(value)} is not allowed ({field}: {problem})") from None


def grid(
    studio: Studio,
    mix: dict[str, float],
    settings: RenderSettings,
    x: Axis,
    y: Axis,
    progress: Progress | None = None,
    shards: Views | None = None,
) -> tuple[list[list[Rendered]], list[str], list[str]]:
    """Soups over X x Y (an XY plot for N-shard soups); returns rows of images and the axis labels.

    Every cell is checked before the first is rendered; runs at background priority, cell by cell."""
    report = progress or (lambda f, d: None)
    cells = []
    for yv in y.values:
        for xv in x.values:
            m, s = y.apply(yv, mix, settings)
            m, s = x.apply(xv, m, s)
            studio.mix_key(m, shards=shards)
            cells.append((yv, xv, m, s))
    rows: list[list[Rendered]] = []
    with studio.lock.background():
        for n, (yv, xv, m, s) in enumerate(cells):
            report(n / len(cells), f"{y.label(yv)}, {x.label(xv)}")
            if n % len(x.values) == 0:
                rows.append([])
            rows[-1].append(studio.render_soup(m, s, shards=shards))
    report(1.0, "done")
    return rows, [y.label(v) for v in y.values], [x.label(v) for v in x.values]


class EnsembleUNet(torch.nn.Module):
    """Several UNets behind one: the weighted sum of their noise predictions.

    By the paper's Proposition, sampling with the summed scores samples from the geometric mean of
    the components' distributions, which the weight soup approximates.
    """

    def __init__(self, unets: Sequence[torch.nn.Module], weights: Sequence[float]):
        super().__init__()
        self.unets = torch.nn.ModuleList(unets)
        self.weights = list(weights)

    @property
    def config(self):
        return self.unets[0].config

    @property
    def dtype(self):
        return self.unets[0].dtype

    @property
    def device(self):
        return self.unets[0].device

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        total = None
        for unet, w in zip(self.unets, self.weights):
            pred = unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0] * w
            total = pred if total is None else total + pred
        return UNet2DConditionOutput(sample=total) if return_dict else (total,)


def ensemble(studio: Studio, mix: dict[str, float], settings: RenderSettings, shards: Views | None = None) -> tuple[Rendered, Rendered]:
    """The geometric-mean reference (one UNet call per component per step) and the weight soup,
    the first labelled with its pixel distance to the second. Runs at background priority."""
    pairs = [(s, w) for s, w in studio.normalized(mix, shards) if w > 0]
    if any(s.unet is None for s, _ in pairs):
        raise StudioError("the ensemble needs every component in memory as a full UNet; it is not available for shards streamed (lean) or held in pinned CPU memory, nor for LoRA shards")

    def make():
        studio.check_settings(settings)
        return studio._denoise(EnsembleUNet([s.unet for s, _ in pairs], [w for _, w in pairs]), settings, "ensemble")

    with studio.lock.background():
        soup_image = studio.render_soup(mix, settings, shards=shards)
        image = studio.cached(("ensemble", studio.mix_key(mix, shards=shards), settings), make)
    d = pixel_distance(image, soup_image.image)
    label = "ensemble: " + " + ".join(f"{w:.2f} {s.name}" for s, w in pairs)
    return Rendered(f"{label} ({d:.1f} px from the soup)", image, "ensemble", {"pixels": d}), soup_image
