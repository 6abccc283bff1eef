"""Can the embedded model draw a style once it knows the content? A probe of what caps own style.

    python bench/memorize_probe.py --style twemoji

Finetunes the base UNet, as the recipe finetunes a shard (same rate, min-SNR, EMA), on only that
style's images of the emoji that bench/emoji_eval.py prompts with (40 images, ~240 epochs in 300
steps), then writes a sheet: the shipped shard, the probe, and the real images in three styles, for
the first 10 of those prompts. Judge the probe's snapshots with
`python bench/emoji_eval.py --curves .cache/memorize-probe/work --guidance 5`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from emoji_eval import evaluated_ids  # noqa: E402
from soup_ui.cli import quiet_libraries  # noqa: E402
from soup_ui.modelfiles.presets import RenderSettings, load_preset  # noqa: E402
from soup_ui.training.recipes.emoji import BUDGET, CAPTIONS  # noqa: E402
from soup_ui.engine.sheet import grid  # noqa: E402
from soup_ui.engine.studio import Studio  # noqa: E402
from soup_ui.training.train import TrainConfig, finetune_unet  # noqa: E402


def subset_folder(data: Path, out: Path, style: str, emoji_ids: set[str]) -> list[dict]:
    """An imagefolder of links to `style`'s images of `emoji_ids` (the dataset is never copied)."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["emoji_id"] in emoji_ids and r["style"] == style]
    (out / style).mkdir(parents=True, exist_ok=True)
    for r in keep:
        link = out / r["file_name"]
        if not link.exists():
            link.symlink_to((data / r["file_name"]).resolve())
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return keep


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "emoji-styles")
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "emoji-styles.yaml")
    parser.add_argument("--style", default="twemoji")
    parser.add_argument("--compare", default="fluent-flat,noto", help="real styles shown beside it")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "memorize-probe")
    parser.add_argument("--sheet", type=Path, default=ROOT / "assets" / "readme" / "memorize-probe.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_libraries()

    rows = [json.loads(line) for line in (args.data / "metadata.jsonl").read_text().splitlines()]
    ids = sorted({r["emoji_id"] for r in rows})
    chosen = evaluated_ids(ids, 0, 40)
    subset_folder(args.data, args.work / "data", args.style, set(chosen))
    studio = Studio(load_preset(args.preset))
    config = TrainConfig(
        pipeline=str(studio.preset.base), data=str(args.work / "data"), out=str(args.work / f"{args.style}.safetensors"),
        where={"style": args.style}, caption_column=CAPTIONS, steps=args.steps, batch_size=BUDGET.shard_batch,
        learning_rate=BUDGET.shard_lr, warmup_steps=20, min_snr_gamma=BUDGET.min_snr_gamma, ema_decay=BUDGET.ema_decay,
        snapshot_steps=tuple(range(100, args.steps + 1, 100)), checkpoint_every=100,
        checkpoint_dir=str(args.work / "work" / f"shard-{args.style}"),
    )
    probe = finetune_unet(config, resume=True)

    studio.add_shard("probe", probe)
    by = {(r["emoji_id"], r["style"]): r for r in rows}
    shown = chosen[:10]
    prompts = [f"{by[(e, args.style)]['text_ascii']}, {by[(e, args.style)]['subcategory']}" for e in shown]
    settings = RenderSettings(**studio.preset.render.model_dump(exclude={"prompts", "prompt"}))
    batch = [settings.model_copy(update={"prompt": p, "seed": i}) for i, p in enumerate(prompts)]
    columns = {f"{args.style} shard": list(studio.render_soup_batch(studio.make_mix({args.style: 1.0}), batch)),
               f"{args.style}, 40 emoji": list(studio.render_soup_batch(studio.make_mix({"probe": 1.0}), batch))}
    for style in [args.style] + [s for s in args.compare.split(",") if s]:
        columns[f"real {style}"] = [Image.open(args.data / by[(e, style)]["file_name"]).convert("RGB") for e in shown]
    labels = list(columns)
    grid([[columns[label][i] for label in labels] for i in range(len(shown))], prompts, labels, tile=72).save(args.sheet)
    logging.info("wrote %s", args.sheet)


if __name__ == "__main__":
    main()
