"""Image-folder datasets with captions (the layout diffusers' text-to-image training reads)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass
class CaptionedImages:
    """Images as a uint8 tensor (N, 3, H, W) with one caption and one metadata row per image."""

    pixels: torch.Tensor
    captions: list[str]  # the first caption variant of each image
    rows: list[dict]
    variants: list[tuple[str, ...]] = ()  # every caption variant of each image (see `caption_templates`)


def parse_where(where: list[str] | None) -> dict[str, str]:
    """Turn ["style=twemoji", ...] into {"style": "twemoji", ...}."""
    out = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"filter {item!r} must look like COLUMN=VALUE")
        out[key] = value
    return out


def read_metadata(data_dir: str | Path, where: dict[str, str] | None = None) -> list[dict]:
    """Rows of `metadata.jsonl` whose columns match every `where` item."""
    path = Path(data_dir) / "metadata.jsonl"
    if not path.is_file():
        raise ValueError(f"{data_dir}: no metadata.jsonl (expected the imagefolder layout)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for key, value in (where or {}).items():
        if rows and key not in rows[0]:
            raise ValueError(f"{path}: no column {key!r}; columns are {sorted(rows[0])}")
        rows = [r for r in rows if str(r.get(key)) == value]
    if not rows:
        raise ValueError(f"{path}: no rows match {where}")
    return rows


def caption_templates(caption_column: str) -> list[str]:
    """A caption spec -> format templates: "text" (a column), "{text}, {subcategory}" (a template) or
    several templates joined by "|", one of which a trainer draws per sample."""
    return [t if "{" in t else "{" + t + "}" for t in caption_column.split("|")]


def format_caption(template: str, row: dict, where: str = "metadata.jsonl") -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where}: caption template {template!r} needs a column the rows lack ({err}); columns are {sorted(row)}") from None


def load_captioned_images(
    data_dir: str | Path,
    size: int,
    where: dict[str, str] | None = None,
    caption_column: str = "text",
) -> CaptionedImages:
    """Read every matching image, resized to `size` x `size` RGB."""
    data_dir = Path(data_dir)
    rows = read_metadata(data_dir, where)
    templates = caption_templates(caption_column)
    where_ = f"{data_dir}/metadata.jsonl"
    variants = [tuple(format_caption(t, row, where_) for t in templates) for row in rows]
    pixels = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        with Image.open(data_dir / row["file_name"]) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            pixels[i] = np.asarray(im)
    logger.info("read %d images from %s (filter %s)", len(rows), data_dir, where or "none")
    return CaptionedImages(
        pixels=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        captions=[v[0] for v in variants],
        rows=rows,
        variants=variants,
    )


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range diffusers' VAEs expect."""
    return pixels.float().div(127.5).sub(1.0)


def held_out_ids(ids: list[str], seed: int = 0, fraction: int = 10) -> set[str]:
    """One emoji id in `fraction`, drawn by `seed` from the sorted ids: the evaluation's held-out emoji
    (bench/emoji_eval.py judges round trips on them; the recipe's decoder stage never trains on them)."""
    import random

    ordered = sorted(ids)
    return set(random.Random(seed).sample(ordered, len(ordered) // fraction))
