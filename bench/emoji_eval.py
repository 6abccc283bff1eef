"""Evaluate the embedded emoji model: style and content classifiers judge generated images.

    python bench/emoji_eval.py --data ../shared/data/emoji-styles

1. Trains three small CNNs on the dataset (cached in .cache/emoji-eval/):
   - style: 6-way, accuracy on held-out emoji (10% of emoji ids, all their styles, never seen);
   - content: which of the 1,595 emoji, top-5 on held-out images (one style per emoji held out);
   - category: the 9 top-level emoji categories, accuracy on held-out emoji.
2. Renders N prompts (emoji names, with their subcategory unless --captions names) with the base
   model, every specialist, the uniform soup, a few pair soups and every leave-one-out soup, all
   from the same seeds, through the studio's own code path.
3. Prints the table (mean style probabilities, own-style rate, category top-1, name top-5), the
   paper's claims at toy scale (pair soups are mixtures, the uniform soup spreads, leaving a shard
   out lowers its own style most) and writes the contact sheet PNG.

    python bench/emoji_eval.py --curves .cache/recipe-emoji      # own style against shard steps
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soup_ui.cli import quiet_libraries  # noqa: E402
from soup_ui.training.data import held_out_ids, load_captioned_images, to_model_range  # noqa: E402
from soup_ui.training.judges import SmallCNN, shift  # noqa: E402  (the shipped judges' network)
from soup_ui.modelfiles.presets import RenderSettings, load_preset  # noqa: E402
from soup_ui.engine.sheet import grid  # noqa: E402
from soup_ui.engine.studio import Studio  # noqa: E402

logger = logging.getLogger("emoji_eval")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the classifiers train and judge here
STYLES = ["fluent-color", "fluent-flat", "fluent-hc", "twemoji", "noto", "openmoji"]
PAIRS = [("twemoji", "openmoji"), ("fluent-hc", "noto"), ("fluent-color", "openmoji")]


def fit(model, x, y, epochs, batch=128, lr=2e-3, seed=0, desc=""):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    model.to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g).to(DEVICE)
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
    model.to(DEVICE)
    return torch.cat([F.softmax(model(x[i : i + batch].to(DEVICE)), -1).cpu() for i in range(0, len(x), batch)])


def classifiers(data: Path, cache: Path, seed: int = 0, epoch_scale: float = 1.0):
    """Train (or load) the style and content classifiers; returns them, the split and their scores."""
    from safetensors.torch import load_file, save_file

    images = load_captioned_images(data, 64, caption_column="text_ascii")
    x = to_model_range(images.pixels)
    ids = sorted({r["emoji_id"] for r in images.rows})
    held_emoji = held_out_ids(ids, seed)
    content_of = {e: i for i, e in enumerate(ids)}
    style_y = torch.tensor([STYLES.index(r["style"]) for r in images.rows])
    content_y = torch.tensor([content_of[r["emoji_id"]] for r in images.rows])
    held_style = {e: STYLES[i % 6] for i, e in enumerate(ids)}  # one image per emoji held out for content
    s_train = torch.tensor([r["emoji_id"] not in held_emoji for r in images.rows])
    c_train = torch.tensor([held_style[r["emoji_id"]] != r["style"] for r in images.rows])
    categories = sorted({r["category"] for r in images.rows})
    category_y = torch.tensor([categories.index(r["category"]) for r in images.rows])
    style, content, category = SmallCNN(6, 32), SmallCNN(len(ids), 48), SmallCNN(len(categories), 32)
    cache.mkdir(parents=True, exist_ok=True)
    jobs = (("style", style, style_y, s_train, 12), ("content", content, content_y, c_train, 20), ("category", category, category_y, s_train, 12))
    for name, model, y, train, epochs in jobs:
        file = cache / f"{name}.safetensors"
        if file.is_file():
            model.load_state_dict(load_file(str(file), device=str(DEVICE)))
            model.eval()
        else:
            t0 = time.time()
            fit(model, x[train], y[train], max(1, round(epochs * epoch_scale)), seed=seed, desc=name)
            save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(file))
            logger.info("%s classifier trained in %.0f s", name, time.time() - t0)
    p_style = predict(style, x[~s_train])
    correct = p_style.argmax(-1) == style_y[~s_train]
    style_acc = correct.float().mean().item()
    per_style = {st: correct[style_y[~s_train] == i].float().mean().item() for i, st in enumerate(STYLES)}
    p_content = predict(content, x[~c_train])
    top5 = (p_content.topk(5, -1).indices == content_y[~c_train, None]).any(-1).float().mean().item()
    category_acc = (predict(category, x[~s_train]).argmax(-1) == category_y[~s_train]).float().mean().item()
    scores = {"style_acc": style_acc, "content_top5": top5, "per_style": per_style, "category_acc": category_acc}
    return Judges(style, content, category, categories), ids, held_emoji, scores


@dataclass
class Judges:
    """The three classifiers: style (6-way), content (which emoji), coarse category (9-way)."""

    style: nn.Module
    content: nn.Module
    category: nn.Module
    categories: list[str]

    def judge(self, images: list, truth_ids: torch.Tensor, truth_categories: torch.Tensor) -> dict:
        x = torch.stack([to_model_range(torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)) for im in images])
        ps, pc, pk = predict(self.style, x), predict(self.content, x), predict(self.category, x)
        return {
            "p_style": ps.mean(0).tolist(),
            "style_of": ps.argmax(-1).tolist(),
            "content_top5": (pc.topk(5, -1).indices == truth_ids[:, None]).any(-1).float().mean().item(),
            "category_top1": (pk.argmax(-1) == truth_categories).float().mean().item(),
        }


def evaluated_ids(ids: list[str], seed: int, count: int) -> list[str]:
    """The emoji the evaluation prompts with: `count` of the sorted ids, drawn with the seed."""
    return random.Random(seed + 1).sample(ids, count)


def render_all(studio, models, prompts, base_settings, seed) -> dict[str, list]:
    """Every model on every prompt, the same seed per prompt (so images differ by weights alone),
    in batched denoising passes."""
    batch = [base_settings.model_copy(update={"prompt": p, "seed": seed + i}) for i, p in enumerate(prompts)]
    outputs = {}
    for label, mix in models:
        outputs[label] = studio.render_soup_batch(studio.make_mix(mix), batch)
        logger.info("rendered %s", label)
    return outputs


@torch.no_grad()
def vae_round_trips(vae, style: nn.Module, data: Path, held_emoji: set, per_style: int = 40) -> str:
    """How often the style classifier still reads real held-out emoji as their style after a trip
    through the VAE (encode, decode): the ceiling the VAE puts on every shard; and the L1 error."""
    images = load_captioned_images(data, 64, caption_column="text_ascii")
    parts = []
    for i, name in enumerate(STYLES):
        idx = [j for j, r in enumerate(images.rows) if r["style"] == name and r["emoji_id"] in held_emoji][:per_style]
        x = to_model_range(images.pixels[idx]).to(vae.device, vae.dtype)
        r = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).float()
        own = (predict(style, r).argmax(-1) == i).float().mean().item()
        parts.append(f"{name} {own:.0%} (L1 {(r - x.float()).abs().mean().item():.3f})")
    return "; ".join(parts)


def single_image_seconds(studio, mix, prompts, base_settings, seed, count: int = 8) -> float:
    """Median seconds for one interactive soup render (one image, uncached seeds), as the page renders."""
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        studio.render_soup(studio.make_mix(mix), base_settings.model_copy(update={"prompt": prompts[i % len(prompts)], "seed": seed + 10_000 + i}))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def paper_claims(verdicts: dict[str, dict], specialists: list[str]) -> list[str]:
    """The paper's claims at toy scale, as lines of the report: pair soups are mixtures, the uniform
    soup spreads over all styles, and removing a shard lowers its own style most (unlearning)."""
    lines = []
    for label, v in verdicts.items():
        if " + " in label:
            a, b = label.split(" + ")
            pa, pb = v["p_style"][STYLES.index(a)], v["p_style"][STYLES.index(b)]
            ok = pa >= 0.2 and pb >= 0.2 and max(v["p_style"]) < 0.8
            lines.append(f"- pair soup {label}: P({a}) {pa:.2f}, P({b}) {pb:.2f}, max {max(v['p_style']):.2f}: {'a mixture' if ok else 'NOT a mixture'}")
    if "uniform soup" in verdicts:
        p = verdicts["uniform soup"]["p_style"]
        entropy = -sum(x * np.log(x) for x in p if x > 0) / np.log(len(p))
        lines.append(f"- uniform soup: P(style) {', '.join(f'{x:.2f}' for x in p)}; normalized entropy {entropy:.2f} (1 = even)")
    for name in specialists:
        label = f"without {name}"
        if label in verdicts and "uniform soup" in verdicts:
            drop = [u - w for u, w in zip(verdicts["uniform soup"]["p_style"], verdicts[label]["p_style"])]
            own = drop[STYLES.index(name)]
            most = STYLES[int(np.argmax(drop))]
            lines.append(f"- leave {name} out: its P drops {own:+.2f}; the largest drop is {most}'s ({max(drop):+.2f}): "
                         f"{'unlearned' if most == name else 'NOT the largest'}")
    return lines


def curves(args, studio, judges, prompts, truth, truth_cat, base_settings) -> None:
    """Own-style rate and category top-1 of each specialist's EMA snapshots (the recipe's
    `snapshot-<step>.safetensors` files under --curves), against its training steps."""
    rows = []
    for style in [s for s in STYLES if (args.curves / f"shard-{s}").is_dir()]:
        for file in sorted((args.curves / f"shard-{style}").glob("snapshot-*.safetensors"), key=lambda f: int(f.stem.split("-")[1])):
            name = f"{style}@{file.stem.split('-')[1]}"
            studio.add_shard(name, file)
            v = judges.judge(render_all(studio, [(name, {name: 1.0})], prompts, base_settings, args.seed)[name], truth, truth_cat)
            studio.remove_shard(name)
            own = np.mean([s == STYLES.index(style) for s in v["style_of"]])
            rows.append((style, int(file.stem.split("-")[1]), own, v["category_top1"], v["content_top5"]))
    print("\n| shard | steps | own style | category top-1 | name top-5 |")
    print("|---|---|---|---|---|")
    for style, step, own, cat, top5 in rows:
        print(f"| {style} | {step} | {own:.0%} | {cat:.0%} | {top5:.0%} |")
    if args.curves_json:
        points = [{"style": s, "steps": n, "own_style": round(float(o), 4), "category_top1": round(c, 4), "name_top5": round(t, 4)} for s, n, o, c, t in rows]
        record = {"label": args.label or str(args.curves), "base": str(studio.preset.base), "prompts": len(prompts),
                  "render": base_settings.model_dump(exclude={"prompt", "negative_prompt", "seed"}), "points": points}
        args.curves_json.write_text(json.dumps(record, indent=1) + "\n")
        logger.info("wrote %s", args.curves_json)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "emoji-styles")
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "emoji-styles.yaml")
    parser.add_argument("--prompts", type=int, default=40, help="emoji to render per model")
    parser.add_argument("--captions", choices=["names", "names+subcategory"], default="names+subcategory",
                        help="prompt form: the emoji's name, or name and subcategory as the v3 recipe trains")
    parser.add_argument("--sheet-prompts", default="", help="comma-separated prompts for the contact sheet (default: the preset's examples)")
    parser.add_argument("--sheet", type=Path, default=ROOT / "assets" / "emoji" / "contact-sheet.png")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "emoji-eval")
    parser.add_argument("--curves", type=Path, help="a recipe --work folder: evaluate the shards' snapshots against their steps")
    parser.add_argument("--curves-json", type=Path, help="with --curves: also write the points as JSON (for bench/curves.py)")
    parser.add_argument("--label", default="", help="with --curves-json: what this run is, for the plot's legend")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the preset's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    parser.add_argument("--specialists-only", action="store_true", help="judge the base and the specialists only (no soups, no sheet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-epochs", type=float, default=1.0, help="scale the classifiers' epochs (a smoke test uses 0.05)")
    parser.add_argument("--classifiers-only", action="store_true", help="train and score the classifiers, then stop")
    parser.add_argument("--sheet-only", action="store_true", help="only render the contact sheet (no classifiers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_libraries()
    torch.manual_seed(args.seed)

    studio = Studio(load_preset(args.preset))
    r = studio.preset.render
    overrides = {k: v for k, v in {"guidance_scale": args.guidance, "steps": args.steps}.items() if v is not None}
    base_settings = RenderSettings(**{**r.model_dump(exclude={"prompts", "prompt"}), **overrides})  # validated, as the page's
    specialists = [s for s in STYLES if s in studio.shards]
    studio.add_shard("base", studio.preset.base / "unet", description="the base model, before finetuning")
    if args.sheet_only:
        return write_sheet(args, studio, sheet_models(studio, specialists), base_settings)
    judges, ids, held_emoji, scores = classifiers(args.data, args.cache, args.seed, args.classifier_epochs)
    if args.classifiers_only:
        print(f"style accuracy {scores['style_acc']:.1%}, content top-5 {scores['content_top5']:.1%}, category {scores['category_acc']:.1%}")
        return
    rows = {}
    for row in (json.loads(line) for line in (args.data / "metadata.jsonl").read_text().splitlines()):
        rows.setdefault(row["emoji_id"], row)
    prompt_ids = evaluated_ids(ids, args.seed, args.prompts)
    form = (lambda e: rows[e]["text_ascii"]) if args.captions == "names" else (lambda e: f"{rows[e]['text_ascii']}, {rows[e]['subcategory']}")
    prompts = [form(e) for e in prompt_ids]
    truth = torch.tensor([ids.index(e) for e in prompt_ids])
    truth_cat = torch.tensor([judges.categories.index(rows[e]["category"]) for e in prompt_ids])
    if args.curves:
        return curves(args, studio, judges, prompts, truth, truth_cat, base_settings)

    models = sheet_models(studio, specialists)
    if args.specialists_only:
        models = [m for m in models if m[0] == "base" or m[0] in specialists]
    else:
        models += [(f"without {s}", {o: 1.0 for o in specialists if o != s}) for s in specialists]
    outputs = render_all(studio, models, prompts, base_settings, args.seed)
    per_image = single_image_seconds(studio, {s: 1.0 for s in specialists}, prompts, base_settings, args.seed)
    verdicts = {label: judges.judge(images, truth, truth_cat) for label, images in outputs.items()}

    per_style = ", ".join(f"{k} {v:.0%}" for k, v in scores["per_style"].items())
    trips = vae_round_trips(studio.pipe.vae, judges.style, args.data, held_emoji)
    print(f"\nClassifiers on real held-out data: style accuracy {scores['style_acc']:.1%} (held-out emoji; {per_style}), "
          f"content top-5 {scores['content_top5']:.1%} (held-out images), category top-1 {scores['category_acc']:.1%} (held-out emoji)\n")
    print(f"VAE round trips of held-out emoji, read as their own style: {trips}\n")
    print(f"Generated: {args.prompts} emoji ({args.captions} prompts) x {len(models)} models, {base_settings.steps} steps, "
          f"guidance {base_settings.guidance_scale}, {base_settings.scheduler}; {per_image:.2f} s per 64x64 soup image rendered alone (median of 8) on {studio.device}\n")
    print("| model | " + " | ".join(f"P({s})" for s in STYLES) + " | own style | category top-1 | name top-5 |")
    print("|" + "---|" * (len(STYLES) + 4))
    for label, v in verdicts.items():
        own = f"{np.mean([s == STYLES.index(label) for s in v['style_of']]):.0%}" if label in STYLES else ""
        probs = " | ".join(f"{p:.2f}" for p in v["p_style"])
        print(f"| {label} | {probs} | {own} | {v['category_top1']:.0%} | {v['content_top5']:.0%} |")
    if args.specialists_only:
        return
    print("\nThe paper's claims at toy scale:")
    print("\n".join(paper_claims(verdicts, specialists)))
    write_sheet(args, studio, [m for m in models if not m[0].startswith("without")], base_settings)


def sheet_models(studio, specialists) -> list[tuple[str, dict[str, float]]]:
    models: list[tuple[str, dict[str, float]]] = [("base", {"base": 1.0})] if "base" in studio.shards else []
    models += [(s, {s: 1.0}) for s in specialists]
    models += [("uniform soup", {s: 1.0 for s in specialists})]
    models += [(f"{a} + {b}", {a: 1.0, b: 1.0}) for a, b in PAIRS if a in specialists and b in specialists]
    return models


def write_sheet(args, studio, models, base_settings):
    """The contact sheet: example prompts x models, same seed per row."""
    sheet_prompts = [p for p in args.sheet_prompts.split(",") if p] or list(studio.preset.render.prompts)[:6]
    sheet_rows = []
    for i, prompt in enumerate(sheet_prompts):
        settings = base_settings.model_copy(update={"prompt": prompt, "seed": args.seed + 1000 + i})
        sheet_rows.append([studio.render_soup(studio.make_mix(mix), settings).image for _, mix in models])
    # Columns are models, rows prompts.
    grid(sheet_rows, sheet_prompts, [label for label, _ in models], tile=72).save(args.sheet)
    logger.info("wrote %s", args.sheet)


if __name__ == "__main__":
    main()
