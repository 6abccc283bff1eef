"""Small image classifiers that judge generated emoji: which style an image reads as (6-way) and which
coarse category its content is (9-way). Trained on the emoji dataset by a stage of the emoji recipe
(`--stage judges`), their held-out emoji never seen, and shipped in `assets/emoji/judges/` (safetensors,
their classes and held-out accuracy in the metadata). The soup search scores mixes with them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import held_out_ids, load_captioned_images, to_model_range

logger = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Four strided conv blocks and a linear head; 64x64 RGB in ([-1, 1]), judged at 32x32."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.GELU(), nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features before the head (what a reference image is compared by)."""
        x = F.interpolate(x, size=32, mode="area")  # 32x32 keeps the style and the shape, at a quarter of the cost
        return self.features(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.embed(x))


def shift(x: torch.Tensor, g: torch.Generator, pixels: int = 4) -> torch.Tensor:
    """Random translation by up to `pixels`, padding with white (the data's background)."""
    dy, dx = (torch.randint(-pixels, pixels + 1, (2,), generator=g)).tolist()
    x = F.pad(x, (pixels, pixels, pixels, pixels), value=1.0)
    return x[:, :, pixels + dy : pixels + dy + 64, pixels + dx : pixels + dx + 64]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 128, lr: float = 2e-3, seed: int = 0, desc: str = "") -> nn.Module:
    """Train with AdamW and a one-cycle schedule (torch's), on randomly shifted images, label smoothing 0.1."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc=desc or "classifier"):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(shift(x[idx], g)), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@dataclass
class Judge:
    """A trained classifier and its classes: probabilities and features of PIL images."""

    model: SmallCNN
    classes: list[str]
    accuracy: float  # on held-out emoji

    @staticmethod
    def pixels(images: list) -> torch.Tensor:
        return torch.stack([to_model_range(torch.from_numpy(np.array(im.convert("RGB").resize((64, 64)))).permute(2, 0, 1)) for im in images])

    @torch.no_grad()
    def probabilities(self, images: list) -> torch.Tensor:
        """(images, classes) softmax probabilities."""
        return F.softmax(self.model(self.pixels(images)), -1)

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        return self.model.embed(self.pixels(images))

    def save(self, path: Path, **more) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"classes": json.dumps(self.classes), "accuracy": f"{self.accuracy:.4f}", "width": str(self.model.head.in_features // 4),
                **{k: json.dumps(v) for k, v in more.items()}}
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> Judge:
        """A judge written by `save`; ValueError naming the file when it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            classes = json.loads(meta["classes"])
            model = SmallCNN(len(classes), int(meta.get("width", 32)))
            model.load_state_dict(tensors)
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: not a judge written by the emoji recipe ({err})") from None
        return cls(model.eval(), classes, float(meta.get("accuracy", "nan")))


def train_judges(data: Path, out: Path, seed: int = 0, epochs: int = 12) -> dict[str, float]:
    """Train the style (6 artist styles) and category (9 top-level emoji categories) judges on every
    emoji but the held-out ones (`held_out_ids`, the evaluation's), and write them with their held-out
    accuracy, and the held-out emoji's names and categories (the style search's prompts), to `out`."""
    images = load_captioned_images(data, 64, caption_column="text_ascii")
    x = to_model_range(images.pixels)
    rows = images.rows
    held = held_out_ids(sorted({r["emoji_id"] for r in rows}), seed)
    train = torch.tensor([r["emoji_id"] not in held for r in rows])
    scores = {}
    for name, column in (("style", "style"), ("category", "category")):
        classes = sorted({r[column] for r in rows})
        y = torch.tensor([classes.index(r[column]) for r in rows])
        model = fit(SmallCNN(len(classes)), x[train], y[train], epochs, seed=seed, desc=name)
        with torch.no_grad():
            accuracy = (model(x[~train]).argmax(-1) == y[~train]).float().mean().item()
        Judge(model, classes, accuracy).save(out / f"{name}.safetensors", seed=seed)
        scores[name] = accuracy
        logger.info("%s judge: %.1f%% on held-out emoji", name, 100 * accuracy)
    prompts = sorted({(r["text_ascii"], r["category"]) for r in rows if r["emoji_id"] in held})
    (out / "prompts.json").write_text(json.dumps([{"prompt": p, "category": c} for p, c in prompts], indent=1) + "\n")
    return scores
