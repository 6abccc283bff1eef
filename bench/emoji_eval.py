"""Evaluate the embedded emoji model: style and content classifiers judge generated images.

    python bench/emoji_eval.py --data ../shared/data/emoji-styles

1. Trains two small CNNs on the dataset (cached in .cache/emoji-eval/):
   - style: 6-way, accuracy on held-out emoji (10% of emoji ids, all their styles, never seen);
   - content: which of the 1,595 emoji, top-5 on held-out images (one style per emoji held out).
2. Renders N held-out-free prompts (emoji names) with the base model, every specialist, the uniform
   soup and a few pair soups, all from the same seeds, through the studio's own code path.
3. Prints the tables (markdown) and writes the contact sheet PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soup_ui.cli import quiet_libraries  # noqa: E402
from soup_ui.data import load_captioned_images, to_model_range  # noqa: E402
from soup_ui.presets import RenderSettings, load_preset  # noqa: E402
from soup_ui.sheet import grid  # noqa: E402
from soup_ui.studio import Studio  # noqa: E402

logger = logging.getLogger("emoji_eval")
STYLES = ["fluent-color", "fluent-flat", "fluent-hc", "twemoji", "noto", "openmoji"]
PAIRS = [("twemoji", "openmoji"), ("fluent-hc", "noto"), ("fluent-color", "openmoji")]


class SmallCNN(nn.Module):
    """Four strided conv blocks and a linear head; 64x64 RGB in."""

    def __init__(self, classes: int, width: int = 48):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.GELU(), nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], classes)

    def forward(self, x):
        x = F.interpolate(x, size=32, mode="area")  # 32x32 keeps the style and the shape, at a quarter of the cost
        return self.head(self.features(x).mean((2, 3)))


def shift(x: torch.Tensor, g: torch.Generator, pixels: int = 4) -> torch.Tensor:
    """Random translation by up to `pixels`, padding with white (the data's background)."""
    dy, dx = (torch.randint(-pixels, pixels + 1, (2,), generator=g)).tolist()
    x = F.pad(x, (pixels, pixels, pixels, pixels), value=1.0)
    return x[:, :, pixels + dy : pixels + dy + 64, pixels + dx : pixels + dx + 64]


def fit(model, x, y, epochs, batch=128, lr=2e-3, seed=0, desc=""):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(shift(x[idx], g)), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            logger.info("%s step %d/%d loss %.3f", desc, step + 1, steps, loss.item())
    return model.eval()


@torch.no_grad()
def predict(model, x, batch=256):
    return torch.cat([F.softmax(model(x[i : i + batch]), -1) for i in range(0, len(x), batch)])


def classifiers(data: Path, cache: Path, seed: int = 0):
    """Train (or load) the style and content classifiers; returns them, the split and their scores."""
    from safetensors.torch import load_file, save_file

    images = load_captioned_images(data, 64, caption_column="text_ascii")
    x = to_model_range(images.pixels)
    ids = sorted({r["emoji_id"] for r in images.rows})
    rng = random.Random(seed)
    held_emoji = set(rng.sample(ids, len(ids) // 10))
    content_of = {e: i for i, e in enumerate(ids)}
    style_y = torch.tensor([STYLES.index(r["style"]) for r in images.rows])
    content_y = torch.tensor([content_of[r["emoji_id"]] for r in images.rows])
    held_style = {e: STYLES[i % 6] for i, e in enumerate(ids)}  # one image per emoji held out for content
    s_train = torch.tensor([r["emoji_id"] not in held_emoji for r in images.rows])
    c_train = torch.tensor([held_style[r["emoji_id"]] != r["style"] for r in images.rows])
    style, content = SmallCNN(6, 32), SmallCNN(len(ids), 48)
    cache.mkdir(parents=True, exist_ok=True)
    for name, model, y, train, epochs in (("style", style, style_y, s_train, 12), ("content", content, content_y, c_train, 20)):
        file = cache / f"{name}.safetensors"
        if file.is_file():
            model.load_state_dict(load_file(str(file)))
            model.eval()
        else:
            t0 = time.time()
            fit(model, x[train], y[train], epochs, seed=seed, desc=name)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
            logger.info("%s classifier trained in %.0f s", name, time.time() - t0)
    p_style = predict(style, x[~s_train])
    correct = p_style.argmax(-1) == style_y[~s_train]
    style_acc = correct.float().mean().item()
    per_style = {st: correct[style_y[~s_train] == i].float().mean().item() for i, st in enumerate(STYLES)}
    p_content = predict(content, x[~c_train])
    top5 = (p_content.topk(5, -1).indices == content_y[~c_train, None]).any(-1).float().mean().item()
    return style, content, ids, held_emoji, {"style_acc": style_acc, "content_top5": top5, "per_style": per_style}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "emoji-styles")
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "emoji-styles.yaml")
    parser.add_argument("--prompts", type=int, default=40, help="emoji names to render per model")
    parser.add_argument("--sheet-prompts", default="", help="comma-separated prompts for the contact sheet (default: the preset's examples)")
    parser.add_argument("--sheet", type=Path, default=ROOT / "assets" / "emoji" / "contact-sheet.png")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "emoji-eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifiers-only", action="store_true", help="train and score the classifiers, then stop")
    parser.add_argument("--sheet-only", action="store_true", help="only render the contact sheet (no classifiers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_libraries()
    torch.manual_seed(args.seed)

    if args.sheet_only:
        args.prompts = 0
    else:
        style, content, ids, held_emoji, scores = classifiers(args.data, args.cache, args.seed)
    if args.classifiers_only:
        print(f"style accuracy {scores['style_acc']:.1%}, content top-5 {scores['content_top5']:.1%}")
        return
    rows = [json.loads(line) for line in (args.data / "metadata.jsonl").read_text().splitlines()]
    name_of = {r["emoji_id"]: r["text_ascii"] for r in rows}
    rng = random.Random(args.seed + 1)
    prompt_ids = rng.sample(ids, args.prompts) if args.prompts else []

    studio = Studio(load_preset(args.preset))
    studio.add_shard("base", studio.preset.base / "unet", description="the base model, before finetuning")
    specialists = [s for s in STYLES if s in studio.shards]
    models: list[tuple[str, dict[str, float]]] = [("base", {"base": 1.0})]
    models += [(s, {s: 1.0}) for s in specialists]
    models += [("uniform soup", {s: 1.0 for s in specialists})]
    models += [(f"{a} + {b}", {a: 1.0, b: 1.0}) for a, b in PAIRS if a in specialists and b in specialists]
    r = studio.preset.render
    base_settings = RenderSettings(**r.model_dump(exclude={"prompts", "prompt"}))

    # Render every model on every prompt, same seed per prompt.
    t0 = time.time()
    outputs: dict[str, list] = {}
    for label, mix in models:
        imgs = []
        for i, e in enumerate(prompt_ids):
            settings = base_settings.model_copy(update={"prompt": name_of[e], "seed": args.seed + i})
            imgs.append(studio.render_soup(mix, settings).image)
        outputs[label] = imgs
        logger.info("rendered %s (%.0f s so far)", label, time.time() - t0)
    per_image = (time.time() - t0) / max(1, sum(len(v) for v in outputs.values()))

    # Judge them.
    if args.sheet_only:
        return write_sheet(args, studio, models, base_settings)
    truth = torch.tensor([ids.index(e) for e in prompt_ids])
    per_style = ", ".join(f"{k} {v:.0%}" for k, v in scores["per_style"].items())
    print(f"\nClassifiers on real held-out data: style accuracy {scores['style_acc']:.1%} (held-out emoji; {per_style}), "
          f"content top-5 {scores['content_top5']:.1%} (held-out images)\n")
    print(f"Generated: {args.prompts} emoji names x {len(models)} models, {base_settings.steps} steps, "
          f"guidance {base_settings.guidance_scale}, {base_settings.scheduler}; {per_image:.2f} s per 64x64 image on this machine\n")
    header = "| model | " + " | ".join(f"P({s})" for s in STYLES) + " | own style | content top-5 |"
    print(header)
    print("|" + "---|" * (len(STYLES) + 3))
    for label, imgs in outputs.items():
        x = torch.stack([to_model_range(torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)) for im in imgs])
        ps, pc = predict(style, x), predict(content, x)
        own = f"{(ps.argmax(-1) == STYLES.index(label)).float().mean().item():.0%}" if label in STYLES else ""
        top5 = (pc.topk(5, -1).indices == truth[:, None]).any(-1).float().mean().item()
        probs = " | ".join(f"{p:.2f}" for p in ps.mean(0).tolist())
        print(f"| {label} | {probs} | {own} | {top5:.0%} |")

    write_sheet(args, studio, models, base_settings)


def write_sheet(args, studio, models, base_settings):
    """The contact sheet: example prompts x models, same seed per row."""
    sheet_prompts = [p for p in args.sheet_prompts.split(",") if p] or list(studio.preset.render.prompts)[:6]
    sheet_rows = []
    for i, prompt in enumerate(sheet_prompts):
        settings = base_settings.model_copy(update={"prompt": prompt, "seed": args.seed + 1000 + i})
        sheet_rows.append([studio.render_soup(mix, settings).image for _, mix in models])
    # Columns are models, rows prompts.
    grid(sheet_rows, sheet_prompts, [label for label, _ in models], tile=72).save(args.sheet)
    logger.info("wrote %s", args.sheet)


if __name__ == "__main__":
    main()
