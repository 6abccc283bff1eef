"""Command line: `python -m soup_ui {render,export,train} ...`. Bad arguments exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from .engine import runtime
from .errors import StudioError
from .files import safe_name
from .maths.methods import METHODS
from .maths.soup import normalize_weights
from .modelfiles import pngmeta
from .modelfiles.families import alpha_multipliers
from .modelfiles.presets import (
    SCHEDULERS,
    Preset,
    PresetError,
    Recipe,
    RenderSettings,
    describe_validation_error,
    load_preset,
    load_recipe,
    parse_params,
    preset_data,
    save_recipe,
    write_yaml_atomic,
)
from .modelfiles.presets import parse_blocks as parse_blocks_text
from .modelfiles.presets import parse_mix as parse_mix_text

logger = logging.getLogger("soup_ui")


# What a studio command uses when neither --preset nor --recipe names a preset: the embedded default.
DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "presets" / "emoji-styles.yaml"


class UsageError(ValueError):
    """A bad command-line argument."""


def parse_mix(text: str | None, preset: Preset) -> dict[str, float]:
    """"a=0.5,b=0.5" -> {"a": 0.5, "b": 0.5}; a bare name weighs 1; None -> the preset's defaults."""
    if text is None:
        return {s.name: s.weight for s in preset.shards}
    try:
        mix = parse_mix_text(text)
    except ValueError as err:
        raise UsageError(f"--{err}") from None
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


def render_settings(args: argparse.Namespace, preset: Preset, recipe: Recipe | None = None) -> RenderSettings:
    """The recipe's settings (else the preset's render defaults), overridden by the options given."""
    if recipe is not None:
        defaults = recipe.render.model_dump()
    else:
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


def open_studio(args: argparse.Namespace, job: "Job", only_used: bool = False, exporting: bool = False):
    """The job's studio; the job's render settings then start from the studio's defaults (the
    preset's, else its family's: an SD3 or FLUX preset that names no scheduler gets its own).
    `only_used`: load only the shards the mix reads (a render or an export needs no other)."""
    from .engine.stream import used_names
    from .engine.studio import Studio

    preset = job.preset.model_copy(update={"mix_text_encoders": job.text_encoders})  # the memory plan counts what this job holds
    if only_used:
        used = used_names(job.weights, job.params)
        preset = preset.model_copy(update={"shards": [s for s in preset.shards if s.name in used] or preset.shards})
    studio = Studio(preset, runtime.RuntimeOptions.of(args, exporting=exporting))
    for name, why in studio.failed.items():
        logger.warning("shard %s left out: %s", name, why)
    job.settings = render_settings(args, studio.preset, job.recipe)
    job.mix = studio.make_mix(job.weights, job.method, job.params, text_encoders=job.text_encoders, blocks=job.blocks)  # the one Mix of this command
    return studio


def parse_blocks(items: list[str] | None) -> dict[str, str]:
    """--blocks SHARD=SPEC (repeatable) -> {shard: spec}; the spec is read against the denoiser's
    blocks once the studio is open (families.Blocks.parse)."""
    try:
        return parse_blocks_text(items or [])
    except ValueError as err:
        raise UsageError(f"--blocks: {err}") from None


class Job:
    """What a studio command works on: preset, weights, merge method and parameters and render
    settings, from --recipe and the options (options win); `mix` is built once the studio is open."""

    def __init__(self, args: argparse.Namespace):
        self.recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else None
        preset_path = args.preset or (self.recipe.preset if self.recipe else None) or DEFAULT_PRESET
        self.preset = load_preset(preset_path)
        if args.mix is None and self.recipe is not None:
            self.weights = dict(self.recipe.mix)
        else:
            self.weights = parse_mix(args.mix, self.preset)
        try:  # every check before any model is loaded
            normalize_weights(list(self.weights.values()), list(self.weights))
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.method = args.method or (self.recipe.method if self.recipe else "average")
        same = self.recipe is not None and self.recipe.method == self.method
        try:
            given = parse_params(args.param)
        except ValueError as err:
            raise UsageError(f"--param: {err}") from None
        self.params = {**(self.recipe.params if same else {}), **given}
        if args.scale is not None:  # task arithmetic's lambda, as before --param
            if "lambda" not in METHODS.get(self.method, METHODS["average"]).param_names():
                raise UsageError(f"--scale is the lambda of task arithmetic (and of ties, dare, della); {self.method} has none")
            self.params["lambda"] = args.scale
        try:
            METHODS[self.method].parse(self.params)  # before any model is loaded
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.blocks = {**(self.recipe.blocks if self.recipe and args.mix is None else {}), **parse_blocks(getattr(args, "blocks", None))}
        unknown = [n for n in self.blocks if n not in self.weights]
        if unknown:
            raise UsageError(f"--blocks: {unknown[0]!r} is not in the mix ({', '.join(self.weights)})")
        alpha = getattr(args, "supermerger_alpha", None)
        if alpha is not None:  # SuperMerger's alpha list: two equal shards with multipliers 1 - alpha and alpha
            if len(self.weights) != 2 or self.blocks or self.method != "average":
                raise UsageError("--supermerger-alpha is SuperMerger's weight sum of two models: give --mix A=1,B=1 (A and B in that order), "
                                 "method average and no --blocks")
            try:
                pair = alpha_multipliers(alpha)
            except ValueError as err:
                raise UsageError(f"--supermerger-alpha: {err}") from None
            self.weights = dict.fromkeys(self.weights, 1.0)
            self.blocks = {n: ",".join(repr(v) for v in vector) for n, vector in zip(self.weights, pair)}
        self.text_encoders = next(v for v in (getattr(args, "mix_text_encoders", None), self.recipe and self.recipe.text_encoders, self.preset.mix_text_encoders) if v is not None)
        self.settings = render_settings(args, self.preset, self.recipe)
        self.mix = None

    def as_recipe(self) -> Recipe:
        return Recipe.of(self.preset.source, self.mix, self.settings)


def write_strip(results, out: str | None, title: str) -> None:
    from .engine.sheet import labelled_strip

    if out:
        strip = labelled_strip([(r.label, r.image) for r in results], set_apart=[i for i, r in enumerate(results) if r.kind != "component"], title=title)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        carrier = next((r.image for r in results if r.kind == "soup"), results[-1].image)
        strip.info = {k: v for k, v in carrier.info.items() if isinstance(v, str)}  # the soup's recipe
        pngmeta.save(strip, out) if Path(out).suffix.lower() == ".png" else strip.save(out)
        logger.info("wrote %s", out)


def cmd_render(args: argparse.Namespace) -> None:
    if not args.out and not args.out_dir:
        raise UsageError("render: give --out FILE.png and/or --out-dir DIR")
    job = Job(args)
    studio = open_studio(args, job, only_used=True)
    results = studio.render(job.mix, job.settings)
    if args.ensemble:
        from .engine.workflows import ensemble

        results.append(ensemble(studio, job.mix, job.settings)[0])
    write_strip(results, args.out, job.settings.prompt)
    if args.out_dir:
        folder = Path(args.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for r in results:
            name = {"soup": "soup.png", "ensemble": "ensemble.png"}.get(r.kind, f"{safe_name(r.label)}.png")
            pngmeta.save(r.image, folder / name)  # with its recipe: --recipe FILE.png renders it again
        logger.info("wrote %d images to %s", len(results), folder)
    if args.save_recipe:
        save_recipe(job.as_recipe(), args.save_recipe, overwrite=args.overwrite)
        logger.info("wrote recipe %s", args.save_recipe)


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    args.format = {"diffusers": "pipeline", "safetensors": "unet"}.get(args.format, args.format)
    if args.format != "pipeline" and out.suffix != ".safetensors":
        raise UsageError(f"export: --out must end in .safetensors, got {str(out)!r}")
    if out.exists() and (args.format == "pipeline" or not args.overwrite):
        raise UsageError(f"export: {out} exists; " + ("choose a new folder" if args.format == "pipeline" else "pass --overwrite to replace it"))
    job = Job(args)
    if args.format != "pipeline" and not job.text_encoders:  # file to file, tensor by tensor: no pipeline, no shard held
        from tqdm import tqdm

        from .engine.stream import export as stream_export

        dtype = getattr(torch, args.dtype) if args.dtype else None  # None: each tensor in the base's stored dtype
        with tqdm(total=100, desc=f"export {out.name}", unit="%", disable=not sys.stderr.isatty(), bar_format="{l_bar}{bar}| {elapsed}") as bar:
            _, job.mix = stream_export(job.preset, job.weights, job.method, job.params, out, args.format, dtype, overwrite=args.overwrite,
                                       progress=lambda f: bar.update(round(100 * f) - bar.n), blocks=job.blocks)
        logger.info("wrote %s", out)
        return
    studio = open_studio(args, job, only_used=True, exporting=True)
    if args.format == "unet" and job.text_encoders:
        logger.warning("a UNet file holds no text encoder: the mixed text encoders are not written (use --format single-file or pipeline)")
    studio.export(args.format, job.mix, out, overwrite=args.overwrite)
    logger.info("wrote %s", out)


def cmd_leave_one_out(args: argparse.Namespace) -> None:
    from .engine.workflows import leave_one_out

    job = Job(args)
    results = leave_one_out(open_studio(args, job), job.mix, job.settings)
    for r in results[1:]:
        weights = f", {r.info['weights']:.3e} RMS weight change" if "weights" in r.info else ""
        print(f"without {r.info['without']}: {r.info['pixels']:.2f} mean |pixel| change{weights}")
    write_strip(results, args.out, f"leave one out: {job.settings.prompt}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    from .engine.workflows import interpolate

    job = Job(args)
    studio = open_studio(args, job)
    start = job.mix.reweighted(parse_mix(args.start, job.preset)) if args.start != "soup" else job.mix
    end = job.mix.reweighted(parse_mix(args.end, job.preset)) if args.end != "soup" else job.mix
    results = interpolate(studio, start, end, args.count, job.settings)
    write_strip(results, args.out, f"{args.start} -> {args.end}: {job.settings.prompt}")


def cmd_grid(args: argparse.Namespace) -> None:
    from .engine.sheet import grid as grid_sheet
    from .engine.workflows import Axis, grid

    x, y = Axis.parse(args.x), Axis.parse(args.y)
    job = Job(args)
    rows, row_labels, col_labels = grid(open_studio(args, job), job.mix, job.settings, x, y)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid_sheet([[r.image for r in row] for row in rows], row_labels, col_labels).save(args.out)
    logger.info("wrote %s", args.out)


def cmd_block_sweep(args: argparse.Namespace) -> None:
    from .engine.workflows import block_sweep

    job = Job(args)
    studio = open_studio(args, job)
    results = block_sweep(studio, job.mix, args.a, args.b, job.settings)
    for r in results:
        print(f"{r.info['group']}: {r.info['pixels']:.2f} mean |pixel| change from {args.a}")
    write_strip(results, args.out, f"block sweep {args.a} -> {args.b}: {job.settings.prompt}")


def cmd_add_shard(args: argparse.Namespace) -> None:
    from .modelfiles import formats
    from .modelfiles.presets import ShardSpec

    preset = load_preset(args.preset)
    if any(s.name == args.name for s in preset.shards):
        raise UsageError(f"add-shard: the preset already has a shard named {args.name!r}")
    path = Path(args.path).resolve()
    config, base = formats.base_unet(preset.base, preset.config)
    found = formats.validate(path, config, base.specs, args.name)
    logger.info("%s: %s", args.name, found.kind)
    try:
        shard = ShardSpec(name=args.name, path=path, weight=args.weight, description=args.description)
    except ValidationError as err:
        raise UsageError(describe_validation_error("add-shard", err).replace("\n", "; ")) from None
    extended = preset.model_copy(update={"shards": [*preset.shards, shard]})
    out = Path(args.out)
    write_yaml_atomic(preset_data(extended, out.parent), out, overwrite=args.overwrite)
    logger.info("wrote %s with %d shards", out, len(extended.shards))


def cmd_search(args: argparse.Namespace) -> None:
    """Search the mix of --shards for what a scorer likes best; write the best recipe, the log and a sheet."""
    from .search.run import best_recipe, best_sheet, search, setup, with_groups, write_log

    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise UsageError(f"search: --out is the best recipe, a .yaml file; got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"search: {out} exists; pass --overwrite to replace it")
    if args.budget < 1:
        raise UsageError(f"--budget must be at least 1 candidate, got {args.budget}")
    job = Job(args)
    names = [n.strip() for n in (args.shards or "").split(",") if n.strip()] or [s.name for s in job.preset.shards]
    known = [s.name for s in job.preset.shards]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--shards: unknown shard {unknown[0]!r} (the preset has: {', '.join(known)})")
    job.weights, job.blocks = dict.fromkeys(names, 1.0), {}
    try:  # every check of the scorer before any model loads
        scorer, space, batch = setup(args.scorer, names, job.settings, target=args.target, references=args.reference or (), encoder=args.encoder,
                                     method=job.method, search_params=args.search_param or (), prompts=(args.prompts or "").split("|"), count=args.count)
    except ValueError as err:
        raise UsageError(str(err)) from None
    studio = open_studio(args, job, only_used=True)
    batch = [job.settings.model_copy(update={"prompt": b.prompt}) for b in batch]  # the settings as the family takes them
    if args.block_groups:
        try:
            space = with_groups(space, studio)
        except ValueError as err:
            raise UsageError(f"--block-groups: {err}") from None
    logger.info("searching %s: %d candidates, %s, scorer %s", space.describe(), args.budget, args.strategy, args.scorer)
    found = search(studio, space, scorer, batch, budget=args.budget, seed=job.settings.seed, strategy=args.strategy, params=job.params,
                   progress=lambda f, d: logger.info("%s", d))
    if found.stopped:
        logger.warning("the search stopped early (%s); it keeps the %d candidates it tried", found.stopped, len(found.tried))
    best = found.best
    save_recipe(best_recipe(studio, found, batch[0]), out, overwrite=args.overwrite)
    log = Path(args.log) if args.log else out.with_suffix(".csv")
    write_log(found, log)
    sheet = Path(args.sheet) if args.sheet else out.with_suffix(".png")
    best_sheet(found).save(sheet)
    logger.info("best: %s, score %.4f (plain soup %.4f) -> %s; log %s; sheet %s", best.label, best.score, found.tried[0].score, out, log, sheet)


def cmd_train(args: argparse.Namespace) -> None:
    from .training.data import parse_where
    from .training.train import TrainConfig, finetune_unet

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
        min_snr_gamma=args.min_snr_gamma,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        save_dtype=args.save_dtype,
        device=args.device or "cpu",
    )
    finetune_unet(config, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m soup_ui", description="Diffusion Soup Studio: mix finetuned UNets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def studio_command(name: str, help: str, render_options: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[runtime.parser()])
        p.add_argument("--preset", help="preset YAML file (default: the one --recipe names, else the embedded emoji default)")
        p.add_argument("--recipe", help="recipe YAML file: preset, mix, method, parameters and render settings (options override it)")
        p.add_argument("--mix", help="NAME=WEIGHT,... (default: the recipe's, else every shard at its preset weight)")
        p.add_argument("--method", "--mode", dest="method", choices=list(METHODS), metavar="NAME",
                       help="merge method: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + " (default: average, the paper's soup)")
        p.add_argument("--param", action="append", metavar="NAME=VALUE",
                       help="a parameter of the method, repeatable: " + "; ".join(
                           f"{m.name}: {', '.join(m.param_names())}" for m in METHODS.values() if m.param_names()))
        p.add_argument("--blocks", action="append", metavar="SHARD=SPEC",
                       help="block weights of a shard, repeatable: SPEC is NAME:VALUE pairs (NAME a group: IN, M, OUT for UNets, double, single "
                            "for FLUX, joint for SD3; or a block: IN04, double_blocks.7; later pairs win, e.g. IN:0,IN04:1; blocks not named keep 1) "
                            "or all values in block order (SuperMerger's list, e.g. 26 for SD 1.x: BASE, IN00-IN11, M00, OUT00-OUT11)")
        p.add_argument("--supermerger-alpha", metavar="LIST",
                       help="SuperMerger's block-weighted weight sum of the mix's two shards A and B, in its own meaning: one alpha per block in "
                            "block order, block b = (1 - alpha_b) A + alpha_b B (the --mix weights are then ignored); the label shows each block's shares")
        p.add_argument("--scale", type=float, help="lambda (task arithmetic, ties, dare, della): base + lambda x merged task vector")
        p.add_argument("--mix-text-encoders", action=argparse.BooleanOptionalAction, default=None,
                       help="mix the shards' own text encoders with the same weights (a shard without one counts as the base's); "
                            "default: the recipe's, else the preset's mix_text_encoders (off)")
        if render_options:
            add_render_options(p)
        return p

    p = studio_command("render", "Render each shard and the soup from the same noise into one labelled PNG.")
    p.add_argument("--out", help="the labelled strip, a .png file")
    p.add_argument("--out-dir", help="also write each image as DIR/<shard>.png and DIR/soup.png")
    p.add_argument("--ensemble", action="store_true", help="add the geometric-mean reference (one UNet call per component per step)")
    p.add_argument("--save-recipe", help="write the recipe used (preset, mix, method, parameters, settings) to this YAML file")
    p.add_argument("--overwrite", action="store_true", help="replace --save-recipe if it exists")
    p.set_defaults(run=cmd_render)

    p = studio_command("export", "Write the souped UNet (.safetensors with the recipe in its metadata) or a whole pipeline folder.", False)
    p.add_argument("--out", required=True, help="output .safetensors file, or a new folder with --format pipeline")
    p.add_argument("--format", choices=["unet", "safetensors", "single-file", "diffusers", "pipeline"], default="unet",
                   help="unet (or safetensors): the soup UNet in diffusers naming; single-file: UNet + VAE + text encoder in the original LDM "
                   "naming, fp16 (A1111, Forge, ComfyUI); diffusers (or pipeline): a diffusers pipeline folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .safetensors --out")
    p.set_defaults(run=cmd_export, prompt=None, negative_prompt=None, seed=None, steps=None, guidance_scale=None, height=None, width=None, scheduler=None)

    p = studio_command("leave-one-out", "Render the full soup and the soup without each shard (unlearning), with distances.")
    p.add_argument("--out", help="the labelled strip, a .png file")
    p.set_defaults(run=cmd_leave_one_out)

    p = studio_command("interpolate", "Render soups along the line between two mixes (a hybrid-style strip).")
    p.add_argument("--from", dest="start", required=True, help="start: a shard name, a mix NAME=W,..., or 'soup' (the --mix)")
    p.add_argument("--to", dest="end", required=True, help="end: a shard name, a mix NAME=W,..., or 'soup' (the --mix)")
    p.add_argument("--count", type=int, default=5, help="images along the line, 2 to 32")
    p.add_argument("--out", required=True, help="the labelled strip, a .png file")
    p.set_defaults(run=cmd_interpolate)

    p = studio_command("grid", "Render an X x Y grid of soups into one labelled PNG.")
    p.add_argument("--x", required=True, help="weight:SHARD=0,0.5,1 | block:SHARD:BLOCK=0,0.5,1 (BLOCK a block or group: IN04, OUT, "
                   "double_blocks.7) | seed=0,1,2 | prompt=a|b | guidance=1,4 | steps=5,20")
    p.add_argument("--y", required=True, help="same forms as --x")
    p.add_argument("--out", required=True, help="the grid, a .png file")
    p.set_defaults(run=cmd_grid)

    p = studio_command("block-sweep", "Render shard A, then A with each group of blocks (a UNet's resolution levels, a transformer's "
                       "quarters) taken from shard B, then B: which blocks carry B's style and which its content.")
    p.add_argument("--a", required=True, help="the shard most blocks come from")
    p.add_argument("--b", required=True, help="the shard each group in turn comes from")
    p.add_argument("--out", required=True, help="the labelled strip, a .png file")
    p.set_defaults(run=cmd_block_sweep)

    p = studio_command("search", "Find the soup: search the mix of --shards for the images a scorer likes best (CMA-ES or random "
                       "search over a budget of candidates); write the best recipe, a CSV log of every candidate and a sheet of the best.")
    p.add_argument("--shards", help="the shards to mix, comma-separated (default: every shard of the preset)")
    p.add_argument("--scorer", required=True, help="style (the shipped style judges, with --target), reference (with --reference) or python:MODULE:FUNCTION")
    p.add_argument("--target", help="style: the target share of styles, e.g. twemoji=0.5,openmoji=0.5 (summing to 1)")
    p.add_argument("--reference", action="append", help="reference: a reference image (1 to 8, repeatable)")
    p.add_argument("--encoder", help="reference: an image encoder folder on disk (CLIP, SigLIP or DINO, transformers); default: the style judge's features")
    p.add_argument("--prompts", help="prompts joined by | (default: style: --count held-out emoji names; else --prompt)")
    p.add_argument("--count", type=int, default=4, help="style: how many held-out emoji names to render per candidate")
    p.add_argument("--block-groups", action="store_true", help="search each shard's block-group weights too (IN/M/OUT; the family's groups)")
    p.add_argument("--search-param", action="append", help="a numeric parameter of --method to search over its range (repeatable), e.g. density")
    p.add_argument("--budget", type=int, default=24, help="candidates to render and score (the plain soup is the first)")
    p.add_argument("--strategy", choices=["cmaes", "random"], default="cmaes")
    p.add_argument("--out", required=True, help="the best recipe, a .yaml file (render it with --recipe)")
    p.add_argument("--log", help="every candidate (mix, score): .csv or .json (default: --out with .csv)")
    p.add_argument("--sheet", help="the best candidates' images, a .png (default: --out with .png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("add-shard", help="Validate a UNet against a preset's base and save the preset with it added as a new file.")
    p.add_argument("--preset", required=True, help="the preset to extend")
    p.add_argument("--name", required=True, help="the new shard's name")
    p.add_argument("--path", required=True, help="a .safetensors UNet file or a diffusers unet/ folder")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--description", default="")
    p.add_argument("--out", required=True, help="the new preset file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_add_shard)

    p = sub.add_parser("train", help="Finetune the UNet of a diffusers pipeline on an imagefolder (one shard).")
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (the base model)")
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl")
    p.add_argument("--out", required=True, help="the shard: a .safetensors file of UNet weights")
    p.add_argument("--where", action="append", help="keep rows with COLUMN=VALUE (repeatable), e.g. style=twemoji")
    p.add_argument("--caption-column", default="text", help='a column, a template "{text}, {subcategory}", or templates joined by "|" (one drawn per sample)')
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-snr-gamma", type=float, help="weight the loss by min(SNR, gamma)/SNR (5 is the usual choice)")
    p.add_argument("--ema-decay", type=float, help="save an EMA of the weights with this decay (e.g. 0.999)")
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
    except (UsageError, PresetError, ValueError, FileNotFoundError, StudioError) as err:
        message = str(err).replace("\n", "; ")
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
