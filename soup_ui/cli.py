"""Command line: `python -m soup_ui {render,export,train} ...`. Bad arguments exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from .presets import SCHEDULERS, Preset, PresetError, RenderSettings, describe_validation_error, load_preset

logger = logging.getLogger("soup_ui")


class UsageError(ValueError):
    """A bad command-line argument."""


def parse_mix(text: str | None, preset: Preset) -> dict[str, float]:
    """"a=0.5,b=0.5" -> {"a": 0.5, "b": 0.5}; a bare name weighs 1; None -> the preset's defaults."""
    if text is None:
        return {s.name: s.weight for s in preset.shards}
    mix: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise UsageError(f"--mix: weight of {name!r} is not a number: {value!r}") from None
        if name in mix:
            raise UsageError(f"--mix: shard {name!r} is given twice")
        mix[name] = weight
    if not mix:
        raise UsageError("--mix: no shard given (expected NAME=WEIGHT,NAME=WEIGHT)")
    return mix


def add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="text prompt (default: the preset's first example)")
    p.add_argument("--negative-prompt", help="negative prompt")
    p.add_argument("--seed", type=int, help="seed of the shared initial noise")
    p.add_argument("--steps", type=int, help="denoising steps (num_inference_steps)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, help="image height in pixels (multiple of 8)")
    p.add_argument("--width", type=int, help="image width in pixels (multiple of 8)")
    p.add_argument("--scheduler", help=f"sampler: one of {', '.join(SCHEDULERS)}")


def render_settings(args: argparse.Namespace, preset: Preset) -> RenderSettings:
    """The preset's render defaults, overridden by the options given."""
    defaults = preset.render.model_dump(exclude={"prompts"})
    if preset.render.prompts and not preset.render.prompt:
        defaults["prompt"] = preset.render.prompts[0]
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "scheduler": args.scheduler,
    }
    try:
        return RenderSettings(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
    except ValidationError as err:
        raise UsageError(describe_validation_error("options", err).replace("\n", "; ")) from None


def open_studio(args: argparse.Namespace, preset: Preset):
    from .studio import RuntimeOptions, Studio

    studio = Studio(preset, RuntimeOptions(device=args.device, dtype=args.dtype, lean=True if args.lean else None))
    for name, why in studio.failed.items():
        logger.warning("shard %s left out: %s", name, why)
    return studio


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def cmd_render(args: argparse.Namespace) -> None:
    from .sheet import labelled_strip

    if not args.out and not args.out_dir:
        raise UsageError("render: give --out FILE.png and/or --out-dir DIR")
    preset = load_preset(args.preset)
    mix = parse_mix(args.mix, preset)
    settings = render_settings(args, preset)
    studio = open_studio(args, preset)
    results = studio.render(mix, settings)
    if args.out:
        strip = labelled_strip([(r.label, r.image) for r in results], set_apart=[len(results) - 1], title=settings.prompt)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        strip.save(args.out)
        logger.info("wrote %s", args.out)
    if args.out_dir:
        folder = Path(args.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for r in results:
            r.image.save(folder / ("soup.png" if r.kind == "soup" else f"{safe_name(r.label)}.png"))
        logger.info("wrote %d images to %s", len(results), folder)


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"export: --out must end in .safetensors, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"export: {out} exists; pass --overwrite to replace it")
    preset = load_preset(args.preset)
    mix = parse_mix(args.mix, preset)
    open_studio(args, preset).export(mix, out)


def cmd_train(args: argparse.Namespace) -> None:
    from .data import parse_where
    from .train import TrainConfig, finetune_unet

    config = TrainConfig(
        pipeline=args.pipeline,
        data=args.data,
        out=args.out,
        where=parse_where(args.where),
        caption_column=args.caption_column,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        save_dtype=args.save_dtype,
        device=args.device or "cpu",
    )
    finetune_unet(config, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m soup_ui", description="Diffusion Soup Studio: mix finetuned UNets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def studio_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--preset", required=True, help="preset YAML file")
        p.add_argument("--mix", help="NAME=WEIGHT,... (default: every shard at its preset weight)")
        p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
        p.add_argument("--dtype", help="float16 or float32 (default: float16 on GPU, float32 on CPU)")
        p.add_argument("--lean", action="store_true", help="stream shards from their files (default: when they would not fit)")
        return p

    p = studio_command("render", "Render each shard and the soup from the same noise into one labelled PNG.")
    add_render_options(p)
    p.add_argument("--out", help="the labelled strip, a .png file")
    p.add_argument("--out-dir", help="also write each image as DIR/<shard>.png and DIR/soup.png")
    p.set_defaults(run=cmd_render)

    p = studio_command("export", "Write the souped UNet as .safetensors, with the recipe in its metadata.")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("train", help="Finetune the UNet of a diffusers pipeline on an imagefolder (one shard).")
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (the base model)")
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl")
    p.add_argument("--out", required=True, help="the shard: a .safetensors file of UNet weights")
    p.add_argument("--where", action="append", help="keep rows with COLUMN=VALUE (repeatable), e.g. style=twemoji")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", help="cuda, mps or cpu")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt/ if it exists")
    p.set_defaults(run=cmd_train)
    return parser


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' notices and progress bars out of the studio's output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    quiet_libraries()
    try:
        args.run(args)
    except (UsageError, PresetError, ValueError, FileNotFoundError) as err:
        message = str(err).replace("\n", "; ")
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
