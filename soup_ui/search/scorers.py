"""Scorers: a candidate's images (and their prompts) in, one number out, higher is better, with the
details worth logging (a style scorer's shares). Three kinds:

- `style`: a target share of styles ("twemoji=0.5,openmoji=0.5"), judged by the shipped style judge:
  the score is minus the total-variation distance between the images' mean style probabilities and
  the target, less any drop of the category judge's top-1 below a floor (content kept);
- `reference`: similarity to 1-8 reference images in an image encoder's space (a CLIP, SigLIP or DINO
  model folder on disk, read with transformers; or the style judge's features);
- `python:module:function`: the user's own, images and prompts in, one number per image out.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import StudioError
from ..training.judges import Judge

JUDGES = Path(__file__).resolve().parents[2] / "assets" / "emoji" / "judges"  # the embedded default's style and category judges


class ScorerError(StudioError):
    """A scorer that cannot score (it raised, or returned what is not a number per image)."""


@dataclass
class Scored:
    score: float
    details: dict = field(default_factory=dict)


def parse_target(text: str) -> dict[str, float]:
    """"twemoji=0.5,openmoji=0.5" -> shares; ValueError unless each is a number >= 0 and they sum to 1."""
    target = {}
    for item in (s.strip() for s in (text or "").split(",") if s.strip()):
        name, sep, value = item.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = float("nan")
        if not sep or not name.strip() or not math.isfinite(share) or share < 0:
            raise ValueError(f"target {item!r}: expected STYLE=SHARE with SHARE a number >= 0, e.g. twemoji=0.5,openmoji=0.5")
        target[name.strip()] = share
    if not target:
        raise ValueError("target: give the shares of styles, e.g. twemoji=0.5,openmoji=0.5")
    if abs(sum(target.values()) - 1) > 1e-3:
        raise ValueError(f"target shares sum to {sum(target.values()):g}, not 1")
    return target


class StyleScorer:
    """Distance of the images' style shares to a target, by the style judge (minus a content penalty)."""

    name = "style"

    def __init__(self, target: dict[str, float], judges: Path = JUDGES, categories: list[str] | None = None, floor: float | None = None):
        self.judge = Judge.load(judges / "style.safetensors")
        unknown = [s for s in target if s not in self.judge.classes]
        if unknown:
            raise ValueError(f"target style {unknown[0]!r}: the style judge knows {', '.join(self.judge.classes)}")
        self.target = target
        self.category = Judge.load(judges / "category.safetensors")
        self.categories = categories  # each prompt's true category (content kept), aligned with the images; None: not judged
        self.floor = floor

    def shares(self, images: list) -> dict[str, float]:
        p = self.judge.probabilities(images).mean(0)
        return {c: float(v) for c, v in zip(self.judge.classes, p)}

    def distance(self, shares: dict[str, float]) -> float:
        return 0.5 * sum(abs(shares.get(c, 0.0) - self.target.get(c, 0.0)) for c in self.judge.classes)

    def __call__(self, images: list, prompts: list[str]) -> Scored:
        shares = self.shares(images)
        distance = self.distance(shares)
        details = {"distance": round(distance, 4), "shares": {c: round(v, 4) for c, v in shares.items() if v >= 0.005}}
        score = -distance
        if self.categories:
            truth = [self.category.classes.index(c) for c in self.categories]
            top1 = (self.category.probabilities(images).argmax(-1) == torch.tensor(truth)).float().mean().item()
            details["category_top1"] = round(top1, 4)
            if self.floor is None:  # the first candidate, the plain soup, sets the floor
                self.floor = top1
            if top1 < self.floor:
                score -= self.floor - top1  # content lost: as far below the floor, that much worse
        return Scored(score, details)


class ReferenceScorer:
    """Mean cosine similarity of the candidate's images to reference images, in an encoder's space:
    a transformers model folder (CLIP or SigLIP: image features; DINO and others: the pooled output),
    or, without one, the style judge's features."""

    name = "reference"

    def __init__(self, references: list[Path], encoder: Path | None = None, judges: Path = JUDGES):
        from PIL import Image, UnidentifiedImageError

        if not 1 <= len(references) <= 8:
            raise ValueError(f"give 1 to 8 reference images, got {len(references)}")
        self.references = []
        for path in references:
            try:
                with Image.open(path) as im:
                    self.references.append(im.convert("RGB"))
            except (OSError, UnidentifiedImageError):
                raise ValueError(f"reference {Path(path).name}: not an image") from None
        self.embed = self._encoder(encoder) if encoder else Judge.load(judges / "style.safetensors").features
        self.anchor = F.normalize(self.embed(self.references), dim=-1)

    @staticmethod
    def _encoder(folder: Path):
        from transformers import AutoImageProcessor, AutoModel

        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"encoder {folder}: not an image model folder transformers can read ({err})") from None

        @torch.no_grad()
        def embed(images: list) -> torch.Tensor:
            inputs = processor(images=images, return_tensors="pt")
            if hasattr(model, "get_image_features"):  # CLIP, SigLIP
                out = model.get_image_features(**inputs)
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            out = model(**inputs)
            return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]

        return embed

    def __call__(self, images: list, prompts: list[str]) -> Scored:
        z = F.normalize(self.embed(images), dim=-1)
        similarity = (z @ self.anchor.T).mean().item()
        return Scored(similarity, {"similarity": round(similarity, 4)})


class PythonScorer:
    """The user's function: `module:function`, called with (images, prompts), one number per image."""

    name = "python"

    def __init__(self, spec: str):
        module, sep, function = spec.partition(":")
        if not sep or not module or not function:
            raise ValueError(f"scorer python:{spec}: expected python:MODULE:FUNCTION")
        try:
            self.fn = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"scorer python:{spec}: {err}") from None
        self.spec = spec

    def __call__(self, images: list, prompts: list[str]) -> Scored:
        try:
            values = [float(v) for v in self.fn(images, prompts)]
        except Exception as err:  # noqa: BLE001 - the user's code: any failure stops the search, which keeps what it found
            raise ScorerError(f"scorer python:{self.spec} failed: {type(err).__name__}: {err}") from None
        if len(values) != len(images) or not all(math.isfinite(v) for v in values):
            raise ScorerError(f"scorer python:{self.spec}: expected one finite number per image ({len(images)}), got {values!r}"[:300])
        return Scored(sum(values) / len(values), {"mean": round(sum(values) / len(values), 4)})


def style_prompts(judges: Path = JUDGES) -> list[dict]:
    """The held-out emoji the judges never saw, with their categories: the style search's prompts."""
    return json.loads((judges / "prompts.json").read_text())


def make_scorer(spec: str, *, target: str | None = None, references=(), encoder: Path | None = None, judges: Path = JUDGES):
    """The scorer a spec names: "style" (with `target`), "reference" (with `references`, and an
    `encoder` folder or none) or "python:MODULE:FUNCTION"; ValueError naming what is missing or wrong."""
    if spec == "style":
        if not target:
            raise ValueError("scorer style: give the target shares of styles, e.g. --target twemoji=0.5,openmoji=0.5")
        return StyleScorer(parse_target(target), judges)
    if spec == "reference":
        return ReferenceScorer([Path(p) for p in references], Path(encoder) if encoder else None, judges)
    if spec.startswith("python:"):
        return PythonScorer(spec.removeprefix("python:"))
    raise ValueError(f"scorer {spec!r}: style, reference or python:MODULE:FUNCTION")
