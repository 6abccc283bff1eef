"""The paper's experiments as studio workflows: leave-one-out, interpolation, grids, and the
geometric-mean (ensemble) reference. Each takes a Studio and a `Mix` (whose method and parameters
every image uses) and returns labelled images."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import ValidationError

from ..errors import StudioError
from ..maths import soup
from ..modelfiles.presets import RenderSettings
from .mix import Mix
from .render import Progress, Rendered

if TYPE_CHECKING:
    from .studio import Studio

logger = logging.getLogger(__name__)


def pixel_distance(a, b) -> float:
    """Mean absolute difference of two images, in 0-255 pixel levels."""
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def _coefficients(mix: Mix, names: Sequence[str], weights: Sequence[float] | None = None, params=None) -> list[float] | None:
    """A linear mix's coefficient for each of `names` and then the base (None for other methods);
    `weights` and `params`: one block's, where they differ from the mix's (None weights: the base's)."""
    if not mix.method.linear:
        return None
    if weights is None and params is not None:  # a block that keeps the base's weights
        return [0.0] * len(names) + [1.0]
    shard_c, base_c = mix.method.coefficients(list(mix.weights if weights is None else weights), mix.params if params is None else params)
    by_name = dict(zip(mix.names, shard_c))
    return [by_name.get(n, 0.0) for n in names] + [base_c]


def _tensor_coefficients(mix: Mix, names: Sequence[str]):
    """A linear mix's coefficients (see `_coefficients`) per tensor name: the same for every tensor,
    or with block weights, each tensor's block's; None for other methods."""
    if not mix.method.linear:
        return None
    parts = mix.parts()
    if not parts:
        return _coefficients(mix, names)
    by_part = [_coefficients(mix, names, p.weights, p.params) for p in parts]
    of = {n: i for i, p in enumerate(parts) for n in p.names}
    return lambda name: by_part[of[name]]


@torch.no_grad()
def leave_one_out(studio: Studio, mix: Mix, settings: RenderSettings, progress: Progress | None = None) -> list[Rendered]:
    """The full soup, then the soup without each shard in turn (the paper's Fig. 4 unlearning
    experiment, as pictures), all with the mix's method and parameters; each labelled with how far
    it moved from the full soup in pixels and, for linear methods, in weight space (RMS parameter
    difference). Runs at background priority, image by image."""
    with studio.lock.background():
        return _leave_one_out(studio, mix, settings, progress)


def _leave_one_out(studio: Studio, mix: Mix, settings: RenderSettings, progress) -> list[Rendered]:
    report = progress or (lambda f, d: None)
    if len([w for w in mix.weights if w > 0]) < 2:
        raise StudioError("leave-one-out needs at least two shards with positive weight")
    rests = {}
    for name, w in zip(mix.names, mix.weights):
        if w < 1:
            try:
                rests[name] = mix.without(name)
            except StudioError as err:
                raise StudioError(f"leave-one-out without {name}: {err}") from None
    full = studio.render_soup(mix, settings)
    base = [studio.base_tensors] if mix.method.needs_base else []
    sources = [s.tensors for s in mix.shards] + base
    full_c = _tensor_coefficients(mix, mix.names)
    out = [Rendered(f"full {full.label}", full.image, "soup", {"pixels": 0.0, "weights": 0.0})]
    for i, (name, rest) in enumerate(rests.items()):
        report((i + 1) / (len(rests) + 1), f"soup without {name}")
        image = studio.render_soup(rest, settings).image
        dp = pixel_distance(full.image, image)
        info = {"without": name, "pixels": dp}
        label = f"without {name}: pixels move {dp:.1f}/255 on average"
        if full_c is not None:
            rest_c = _tensor_coefficients(rest, mix.names)
            if callable(full_c) or callable(rest_c):  # block weights: per tensor, its block's coefficients
                both = [c if callable(c) else (lambda name, c=c: c) for c in (full_c, rest_c)]
                difference = lambda name: [a - b for a, b in zip(both[0](name), both[1](name))][: len(sources)]  # noqa: E731
            else:
                difference = [a - b for a, b in zip(full_c, rest_c)][: len(sources)]
            info["weights"] = dw = soup.weight_distance(sources, difference)
            label += f"; weights {dw:.2e} (RMS)"
        out.append(Rendered(label, image, "soup", info))
    report(1.0, "done")
    return out


def interpolate(studio: Studio, start: Mix, end: Mix, steps: int, settings: RenderSettings, progress: Progress | None = None) -> list[Rendered]:
    """Soups along the line from mix `start` (t=0) to mix `end` (t=1), with `end`'s method and
    parameters: the paper's hybrid-style strip. A shard alone is the mix {name: 1}. Runs at
    background priority."""
    if not 2 <= steps <= 32:
        raise StudioError(f"interpolation steps must be between 2 and 32, got {steps}")
    names = list(dict.fromkeys([*start.names, *end.names]))
    a, b = ([m.as_weights().get(n, 0.0) for n in names] for m in (start, end))
    if a == b:
        raise StudioError("the two ends of the interpolation are the same mix: every image would be the same soup")
    mixes = [end.reweighted({n: (1 - t) * wa + t * wb for n, wa, wb in zip(names, a, b)}) for t in (i / (steps - 1) for i in range(steps))]
    report = progress or (lambda f, d: None)
    out = []
    with studio.lock.background():
        for i, mix in enumerate(mixes):
            t = i / (steps - 1)
            report(i / steps, f"t = {t:.2f}")
            r = studio.render_soup(mix, settings)
            out.append(Rendered(f"t={t:.2f}: {r.label}", r.image, "soup", {"t": t}))
    report(1.0, "done")
    return out


def block_sweep(studio: Studio, mix: Mix, a: str, b: str, settings: RenderSettings, progress: Progress | None = None) -> list[Rendered]:
    """Where a shard acts: shard `a` alone, then for each of the denoiser's sweep groups (a UNet's
    resolution levels, a transformer's quarters) the soup with that group taken from shard `b` and
    every other block from `a` (each block is one shard's weights exactly: the plain average with
    weights (1, 0) or (0, 1) per block), then `b` alone. Labelled with the group and how far each
    image moved from `a`'s, in pixels. Runs at background priority."""
    blocks = studio.blocks
    if blocks is None:
        raise StudioError("this denoiser has no block map: the block sweep is unavailable")
    if a == b:
        raise StudioError("the block sweep takes its blocks from two different shards; pick two")
    mixes = [("all from " + a, {a: (1.0,) * len(blocks), b: (0.0,) * len(blocks)})]
    for label, group in blocks.sweep:
        from_b = tuple(1.0 if block in group else 0.0 for block in blocks.ids)
        mixes.append((f"{label} from {b}", {a: tuple(1 - v for v in from_b), b: from_b}))
    mixes.append(("all from " + b, {a: (0.0,) * len(blocks), b: (1.0,) * len(blocks)}))
    built = []
    for label, vectors in mixes:
        try:
            built.append((label, Mix.build(mix.view, {a: 1.0, b: 1.0}, "average", None, mix.text_encoders, vectors, blocks)))
        except StudioError as err:
            raise StudioError(f"block sweep: {err}") from None
    report = progress or (lambda f, d: None)
    out: list[Rendered] = []
    with studio.lock.background():
        for i, (label, m) in enumerate(built):
            report(i / len(built), label)
            image = studio.render_soup(m, settings).image
            moved = pixel_distance(out[0].image, image) if out else 0.0
            out.append(Rendered(f"{label} ({moved:.1f} px from {a})", image, "soup", {"pixels": moved, "group": label}))
    report(1.0, "done")
    return out


AXES = ("weight", "block", "seed", "prompt", "guidance", "steps")


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: what varies (`kind`, and `shard` for a weight axis) and its values."""

    kind: str
    values: tuple
    shard: str | None = None
    block: str | None = None  # a block axis: the block (or group) whose multiplier varies

    def __post_init__(self):
        if self.kind not in AXES:
            raise StudioError(f"grid axis must be one of {', '.join(AXES)}, got {self.kind!r}")
        if self.kind == "weight" and not self.shard:
            raise StudioError("a weight axis names its shard, e.g. weight:twemoji=0,0.5,1")
        if self.kind == "block" and not (self.shard and self.block):
            raise StudioError("a block axis names its shard and block, e.g. block:twemoji:IN04=0,0.5,1")
        if not 1 <= len(self.values) <= 16:
            raise StudioError(f"a grid axis has 1 to 16 values, got {len(self.values)}")

    @classmethod
    def parse(cls, text: str) -> "Axis":
        """"seed=0,1,2", "weight:twemoji=0,0.5,1", "block:twemoji:IN04=0,0.5,1", "prompt=a cat|a dog",
        "guidance=1,4", "steps=5,20"."""
        head, sep, values = text.partition("=")
        if not sep:
            raise StudioError(f"grid axis {text!r} must look like KIND=V1,V2 (kinds: {', '.join(AXES)})")
        kind, _, shard = head.partition(":")
        shard, _, block = shard.partition(":") if kind == "block" else (shard, "", "")
        parts = values.split("|") if kind == "prompt" else values.split(",")
        try:
            cast = {"weight": float, "block": float, "seed": int, "guidance": float, "steps": int, "prompt": str}[kind]
        except KeyError:
            raise StudioError(f"grid axis must be one of {', '.join(AXES)}, got {kind!r}") from None
        try:
            return cls(kind, tuple(cast(p.strip()) for p in parts if p.strip()), shard or None, block or None)
        except ValueError as err:
            raise StudioError(f"grid axis {text!r}: {err}") from None

    def label(self, value) -> str:
        if self.kind == "block":
            return f"{self.shard}:{self.block}={value:g}"
        return f"{self.shard}={value:g}" if self.kind == "weight" else f"{self.kind}={value}"

    def apply(self, value, mix: Mix, settings: RenderSettings) -> tuple[Mix, RenderSettings]:
        if self.kind == "weight":  # the slider value of one shard, the others as entered
            return mix.reweighted({**mix.as_given(), self.shard: float(value)}), settings
        if self.kind == "block":  # one block (or group) of one shard's block weights, the rest as they are
            if mix.block_map is None:
                raise StudioError("this denoiser has no block map: a block axis is unavailable")
            if self.shard not in mix.names:
                raise StudioError(f"grid axis {self.label(value)}: {self.shard!r} is not in the mix ({', '.join(mix.names)})")
            current = mix.as_blocks().get(self.shard, (1.0,) * len(mix.block_map))
            try:
                vector = mix.block_map.apply(current, [f"{self.block}:{value:g}"], f"grid axis block:{self.shard}")
            except ValueError as err:
                raise StudioError(str(err)) from None
            return mix.reweighted(mix.as_given(), {self.shard: vector}), settings
        field = {"seed": "seed", "prompt": "prompt", "guidance": "guidance_scale", "steps": "steps"}[self.kind]
        try:
            return mix, RenderSettings(**{**settings.model_dump(), field: value})
        except ValidationError as err:
            problem = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise StudioError(f"grid axis {self.kind}: {self.label(value)} is not allowed ({field}: {problem})") from None


def grid(
    studio: Studio, mix: Mix, settings: RenderSettings, x: Axis, y: Axis, progress: Progress | None = None
) -> tuple[list[list[Rendered]], list[str], list[str]]:
    """Soups over X x Y (an XY plot for N-shard soups); returns rows of images and the axis labels.

    Every cell is checked before the first is rendered; runs at background priority, cell by cell."""
    report = progress or (lambda f, d: None)
    cells = []
    for yv in y.values:
        for xv in x.values:
            m, s = y.apply(yv, mix, settings)
            m, s = x.apply(xv, m, s)
            cells.append((yv, xv, m, s))
    rows: list[list[Rendered]] = []
    with studio.lock.background():
        for n, (yv, xv, m, s) in enumerate(cells):
            report(n / len(cells), f"{y.label(yv)}, {x.label(xv)}")
            if n % len(x.values) == 0:
                rows.append([])
            rows[-1].append(studio.render_soup(m, s))
    report(1.0, "done")
    return rows, [y.label(v) for v in y.values], [x.label(v) for v in x.values]


class EnsembleDenoiser(torch.nn.Module):
    """Several denoisers behind one: the weighted sum of their predictions, for any family (UNets
    and transformers alike: every argument the pipeline passes goes to each member).

    By the paper's Proposition, sampling with the summed scores samples from the geometric mean of
    the components' distributions, which the weight soup approximates.
    """

    def __init__(self, members: Sequence[torch.nn.Module], coefficients: Sequence[float]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.coefficients = list(coefficients)

    def __getattr__(self, name: str):  # config, dtype, device, ...: the first member's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("members")[0], name)

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """FLUX's pipeline enters the transformer's cache context per branch: every member's."""
        with contextlib.ExitStack() as stack:
            for member in self.members:
                if hasattr(member, "cache_context"):
                    stack.enter_context(member.cache_context(name))
            yield

    def forward(self, *args, return_dict: bool = True, **kwargs):
        total = None
        for member, c in zip(self.members, self.coefficients):
            pred = member(*args, return_dict=False, **kwargs)[0] * c
            total = pred if total is None else total + pred
        if not return_dict:
            return (total,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        output = UNet2DConditionOutput if hasattr(self.members[0], "conv_in") else Transformer2DModelOutput
        return output(sample=total)


def ensemble(studio: Studio, mix: Mix, settings: RenderSettings) -> tuple[Rendered, Rendered]:
    """The geometric-mean reference (one denoiser call per component per step, predictions summed
    with the method's coefficients, the base's included for task arithmetic and add-difference) and
    the weight soup, the first labelled with its pixel distance to the second. Runs at background priority."""
    if mix.blocked:
        raise StudioError("the ensemble reference sums whole denoisers' predictions: it has no block weights (clear them to compare)")
    coefficients = _coefficients(mix, mix.names)
    if coefficients is None:
        raise StudioError(
            f"the ensemble reference sums the components' predictions with fixed coefficients, which only linear methods have "
            f"(average, task-arithmetic, add-difference); {mix.method.name} has none"
        )
    members = [(s.unet, c, s.name) for s, c in zip(mix.shards, coefficients) if c]
    if any(unet is None for unet, _, _ in members):
        raise StudioError(
            "the ensemble needs every component in memory as a full denoiser; it is not available for shards streamed (lean) "
            "or held in pinned CPU memory, nor for LoRA shards"
        )
    if coefficients[-1]:
        members.append((None, coefficients[-1], "base"))

    def make():
        modules = [unet if unet is not None else studio.base_denoiser() for unet, _, _ in members]
        return studio.denoise(EnsembleDenoiser(modules, [c for _, c, _ in members]), settings, "ensemble", mix)

    with studio.lock.background():
        soup_image = studio.render_soup(mix, settings)
        image = studio.renderer.cached(("ensemble", mix.key, mix.text_key, settings), make)
    d = pixel_distance(image, soup_image.image)
    label = "ensemble: " + " + ".join(f"{c:.2f} {name}" for _, c, name in members)
    return Rendered(f"{label} ({d:.1f} px from the soup)", image, "ensemble", {"pixels": d}), soup_image
