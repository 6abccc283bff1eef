"""The Gradio page: thin handlers that turn widget values into one Studio call each."""

from __future__ import annotations

import functools
import html
import logging
import random
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from pydantic import ValidationError

from . import workflows
from .presets import SCHEDULERS, Recipe, RenderSettings, ShardSpec, describe_validation_error, load_preset, save_recipe
from .sheet import grid as grid_sheet
from .soup import MERGE_MODES
from .studio import RuntimeOptions, Studio

logger = logging.getLogger(__name__)

MAX_SHARDS = 12  # shard rows on the page; rows beyond the loaded shards stay hidden

CSS = """
#soup-image { border: 4px solid #d66212; border-radius: 10px; }
#soup-label { color: #d66212; font-weight: 600; }
.pixelated img { image-rendering: pixelated; }
/* Component tiles no larger than the soup: Gradio stretches few items over the row, taller than the gallery. */
#components .grid-container { grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)) !important; }
#soup-image img { width: 100%; height: 100%; object-fit: contain; }
.mixture-bar { display: flex; height: 22px; border-radius: 5px; overflow: hidden; margin: 4px 0; }
.mixture-bar div { color: white; font-size: 11px; line-height: 22px; text-align: center; overflow: hidden; white-space: nowrap; }
"""
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b"]


class StudioHost:
    """The presets offered by the page, a Studio per preset (loaded on first use), and the folders
    the page may read shards from and write files to."""

    def __init__(
        self,
        presets: list[Path],
        options: RuntimeOptions = RuntimeOptions(),
        loader: Callable = Studio,
        models_dirs: list[Path] = (),
        output_dir: Path | None = None,
    ):
        if not presets:
            raise ValueError("no preset to serve")
        self.presets = {p.stem: Path(p) for p in presets}
        self.options = options
        self.loader = loader
        # Shards may be added from these folders only: --models-dir, each preset's folder, and the
        # folders its base and shards live in.
        folders = {p.resolve().parent for p in self.presets.values()}
        for p in self.presets.values():
            try:
                preset = load_preset(p)
            except ValueError:
                continue  # reported when the preset is chosen
            folders |= {Path(preset.base).parent} | {Path(s.path).parent for s in preset.shards}
        self.models_dirs = [Path(d).resolve() for d in models_dirs] + sorted(folders)
        self.output_dir = Path(output_dir or Path.cwd() / "soup-outputs").resolve()  # uploads, exports, saved presets
        self._studios: dict[str, Studio] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, name: str, studio, **kwargs) -> "StudioHost":
        """A host serving one already-loaded studio (tests pass tiny or fake backends this way)."""
        host = cls([Path(studio.preset.source or f"{name}.yaml")], loader=lambda *a, **k: studio, **kwargs)
        host._studios[host.default] = studio
        return host

    @property
    def default(self) -> str:
        return next(iter(self.presets))

    def get(self, name: str | None, progress=None) -> Studio:
        name = name or self.default
        if name not in self.presets:
            raise ValueError(f"unknown preset {name!r} (available: {', '.join(self.presets)})")
        with self._lock:
            if name not in self._studios:
                self._studios[name] = self.loader(load_preset(self.presets[name]), self.options, progress)
            return self._studios[name]

    def allowed_path(self, text: str) -> Path:
        """A path inside the model folders, or ValueError saying which folders are allowed."""
        path = Path(text.strip()).expanduser()
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in self.models_dirs):
            allowed = ", ".join(str(d) for d in self.models_dirs)
            raise ValueError(f"{text!r} is outside the model folders; shards can be added from: {allowed}")
        if not resolved.exists():
            raise ValueError(f"{text!r}: no such file or folder")
        return resolved

    def new_file(self, folder: str, name: str, suffix: str, overwrite: bool = False) -> Path:
        """A path for a file the page writes, inside output_dir; an existing file needs `overwrite`."""
        stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", name.strip()).strip("._") or "untitled"
        path = self.output_dir / folder / (stem if stem.endswith(suffix) else stem + suffix)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; tick 'overwrite' to replace it, or choose another name")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def user_errors(fn):
    """Show library errors as a readable message in the page; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, KeyError) as err:
            raise gr.Error(str(err).strip("'\""), print_exception=False) from None
        except Exception as err:  # a bug: log it whole, show one line
            logger.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error: {type(err).__name__}: {err}", print_exception=False) from None

    return wrapper


def settings_from(prompt, negative, seed, steps, guidance, scheduler, height, width) -> RenderSettings:
    try:
        return RenderSettings(
            prompt=prompt or "",
            negative_prompt=negative or "",
            seed=int(seed) if seed is not None else 0,
            steps=steps,
            guidance_scale=guidance,
            scheduler=scheduler,
            height=height,
            width=width,
        )
    except (ValidationError, TypeError) as err:
        raise ValueError(describe_validation_error("settings", err) if isinstance(err, ValidationError) else str(err)) from None


def parse_api_mix(text: str) -> dict[str, float]:
    """"a=0.5,b=0.5" -> {"a": 0.5, "b": 0.5}; a bare name weighs 1."""
    mix: dict[str, float] = {}
    for item in (p.strip() for p in (text or "").split(",")):
        if item:
            name, sep, value = item.partition("=")
            try:
                mix[name.strip()] = float(value) if sep else 1.0
            except ValueError:
                raise ValueError(f"mix: weight of {name.strip()!r} is not a number: {value!r}") from None
    return mix


def mixture_html(names: list[str], weights: list[float]) -> str:
    """A bar per shard, as wide as its normalized weight."""
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return "<div class='mixture-empty'>No shard selected with a positive weight: nothing to mix.</div>"
    parts = []
    for i, (name, w) in enumerate(zip(names, weights)):
        if w > 0:
            share = w / total
            colour = PALETTE[i % len(PALETTE)]
            label = html.escape(f"{name} {share:.0%}")
            parts.append(f"<div style='width:{share * 100:.2f}%;background:{colour}' title='{label}'>{label}</div>")
    return "<div class='mixture-bar'>" + "".join(parts) + "</div>"


def build_ui(host: StudioHost) -> gr.Blocks:
    """Declare the page and wire its events; `host` provides the studios."""
    with gr.Blocks(title="Diffusion Soup Studio") as demo:
        gr.Markdown(
            "# Diffusion Soup Studio\nMix finetuned UNets by averaging their weights "
            "([Diffusion Soup](https://arxiv.org/abs/2406.08431)): pick shards and weights, and compare each "
            "component with the hybrid, all rendered from the same noise."
        )
        with gr.Row():
            preset = gr.Dropdown(list(host.presets), value=host.default, label="Preset", scale=1)
            status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### Shards")
                rows, checks, sliders, notes = [], [], [], []
                for i in range(MAX_SHARDS):
                    with gr.Group(visible=False) as row:
                        check = gr.Checkbox(value=True, label=f"shard {i}", elem_id=f"shard-check-{i}")
                        slider = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="weight", elem_id=f"shard-weight-{i}")
                        note = gr.Markdown()
                    rows.append(row)
                    checks.append(check)
                    sliders.append(slider)
                    notes.append(note)
                mixture = gr.HTML(elem_id="mixture")
                uniform = gr.Button("Uniform (the paper's uniform soup)", elem_id="uniform")
                with gr.Row():
                    mode = gr.Radio(list(MERGE_MODES), value="average", label="Merge mode", elem_id="mode")
                    scale = gr.Slider(0.0, 3.0, value=1.0, step=0.05, label="Task-arithmetic scale (lambda)", elem_id="scale")
            with gr.Column(scale=1):
                examples = gr.Dropdown([], label="Example prompts", interactive=True)
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    randomize = gr.Button("Randomize seed", size="sm")
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="Guidance scale")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="Scheduler")
                with gr.Row():
                    height = gr.Number(64, label="Height", precision=0, minimum=8)
                    width = gr.Number(64, label="Width", precision=0, minimum=8)
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row(equal_height=True):
            components = gr.Gallery(
                label="Components", columns=4, height=300, object_fit="contain", elem_id="components",
                elem_classes=["pixelated"], allow_preview=False, format="png",
            )
            with gr.Column(scale=0, min_width=260):
                soup_image = gr.Image(label="Soup", type="pil", format="png", height=256, elem_id="soup-image", elem_classes=["pixelated"])
                soup_label = gr.Markdown(elem_id="soup-label")

        settings_inputs = [prompt, negative, seed, steps, guidance, scheduler, height, width]
        job_inputs = [preset, mode, scale, *checks, *sliders, *settings_inputs]
        shard_outputs = [*rows, *checks, *sliders, *notes, mixture]

        def row_mix(studio, flags, weights) -> dict[str, float]:
            """Row i shows the studio's i-th shard (rows are redrawn whenever shards come or go)."""
            return {n: float(weights[i]) for i, n in enumerate(list(studio.shards)[:MAX_SHARDS]) if flags[i]}

        def job(values):
            """(studio, mix, mode, scale, settings) from the values of `job_inputs`."""
            studio, mode_, scale_ = host.get(values[0]), values[1], values[2]
            mix = row_mix(studio, values[3 : 3 + MAX_SHARDS], values[3 + MAX_SHARDS : 3 + 2 * MAX_SHARDS])
            return studio, mix, mode_, float(scale_), settings_from(*values[3 + 2 * MAX_SHARDS :])

        def shard_updates(studio):
            shards = list(studio.shards.values())[:MAX_SHARDS]
            blank = MAX_SHARDS - len(shards)
            return [
                *[gr.Group(visible=i < len(shards)) for i in range(MAX_SHARDS)],
                *[gr.Checkbox(value=True, label=s.name) for s in shards], *[gr.Checkbox(value=False)] * blank,
                *[gr.Slider(value=s.weight) for s in shards], *[gr.Slider(value=0)] * blank,
                *[gr.Markdown(s.description) for s in shards], *[gr.Markdown("")] * blank,
                mixture_html([s.name for s in shards], [s.weight for s in shards]),
            ]

        @user_errors
        def on_preset(name, progress=gr.Progress()):
            studio = host.get(name, lambda f, d: progress(f, desc=d))
            r = studio.preset.render
            first = r.prompt or (r.prompts[0] if r.prompts else "")
            failed = "".join(f"\n\n⚠️ shard **{n}** left out: {html.escape(why)}" for n, why in studio.failed.items())
            lean = ", lean mode (shards streamed from disk)" if studio.lean else ""
            return [
                *shard_updates(studio),
                f"**{studio.preset.name or name}**: {html.escape(studio.preset.description)}"
                f" ({len(studio.shards)} shards on {studio.device}, {str(studio.dtype).removeprefix('torch.')}{lean}){failed}",
                gr.Dropdown(choices=r.prompts, value=first if first in r.prompts else None),
                first, r.negative_prompt, r.seed, r.steps, r.guidance_scale, r.scheduler, r.height, r.width,
            ]

        def on_mixture(name, *values):
            mix = row_mix(host.get(name), values[:MAX_SHARDS], values[MAX_SHARDS:])
            return mixture_html(list(mix), list(mix.values()))

        @user_errors
        def on_generate(*values, progress=gr.Progress()):
            studio, mix, mode_, scale_, settings = job(values)
            results = studio.render(mix, settings, lambda f, d: progress(f, desc=d), mode_, scale_)
            parts, hybrid = results[:-1], results[-1]
            return (
                gr.Gallery(value=[(r.image, r.label) for r in parts], columns=max(1, len(parts))),
                gr.Image(value=hybrid.image, label=hybrid.label),
                hybrid.label,
            )

        @user_errors
        def on_hybrid(*values):
            studio, mix, mode_, scale_, settings = job(values)
            hybrid = studio.render_soup(mix, settings, mode_, scale_)
            return gr.Image(value=hybrid.image, label=hybrid.label), hybrid.label

        def on_uniform(*flags):
            return [gr.Slider(value=1.0 if flag else 0.0) for flag in flags]

        # Events. Generate renders everything (components come from the cache when unchanged);
        # releasing a slider or toggling a shard re-renders the soup once, for the last value only.
        quiet = dict(api_visibility="private")
        render_opts = dict(api_visibility="private", trigger_mode="always_last", concurrency_id="render")
        mixture_inputs = [preset, *checks, *sliders]
        preset_outputs = [*shard_outputs, status, examples, *settings_inputs]
        demo.load(on_preset, [preset], preset_outputs, **quiet)
        preset.input(on_preset, [preset], preset_outputs, **quiet)
        examples.input(lambda p: p, [examples], [prompt], **quiet)
        randomize.click(lambda: random.randint(0, 2**31 - 1), None, [seed], **quiet)
        full = dict(fn=on_generate, inputs=job_inputs, outputs=[components, soup_image, soup_label])
        generate.click(**full, **render_opts)
        for check in checks:
            check.input(on_mixture, mixture_inputs, [mixture], **quiet).then(**full, **render_opts)
        for slider in sliders:
            # .input, not .change: programmatic updates (preset, uniform, recipe, shards) redraw the bar themselves.
            slider.input(on_mixture, mixture_inputs, [mixture], show_progress="hidden", trigger_mode="always_last", **quiet)
            slider.release(on_hybrid, job_inputs, [soup_image, soup_label], **render_opts)
        for control in (mode, scale):
            control.input(on_hybrid, job_inputs, [soup_image, soup_label], **render_opts)
        uniform.click(on_uniform, checks, sliders, **quiet).then(
            on_mixture, mixture_inputs, [mixture], **quiet
        ).then(on_hybrid, job_inputs, [soup_image, soup_label], **render_opts)

        redraw_mixture = dict(fn=on_mixture, inputs=mixture_inputs, outputs=[mixture])
        build_workflow_tabs(host, job, job_inputs, shard_updates, shard_outputs, preset, (mode, scale, settings_inputs), redraw_mixture)
        build_api(host)
    return demo


def build_workflow_tabs(host: StudioHost, job, job_inputs, shard_updates, shard_outputs, preset, mix_values, redraw_mixture) -> None:
    """The paper's workflows: shards in and out, leave-one-out, interpolation and grids, the
    ensemble reference, recipes and export."""
    mode, scale, settings_inputs = mix_values
    render_opts = dict(api_visibility="private", concurrency_id="render")
    with gr.Tabs():
        with gr.Tab("Add / remove shards", elem_id="tab-shards"):
            gr.Markdown(
                "Continual learning and unlearning are re-averages: add a finetuned UNet (validated against the "
                "base exactly like the preset's shards) or remove one. Paths must be inside: "
                + ", ".join(f"`{d}`" for d in host.models_dirs)
            )
            with gr.Row():
                add_name = gr.Textbox(label="New shard name", elem_id="add-name")
                add_path = gr.Textbox(label="Path (a .safetensors UNet file or a diffusers unet/ folder)", elem_id="add-path")
                add_file = gr.File(label="...or upload a .safetensors UNet", file_types=[".safetensors"], type="filepath")
                add_button = gr.Button("Add shard", elem_id="add-shard")
            with gr.Row():
                remove_name = gr.Textbox(label="Shard to remove", elem_id="remove-name")
                remove_button = gr.Button("Remove shard", elem_id="remove-shard")
            with gr.Row():
                preset_file = gr.Textbox(label="Save the shard set as preset (file name)", elem_id="save-preset-name")
                preset_overwrite = gr.Checkbox(False, label="overwrite if it exists")
                preset_button = gr.Button("Save preset")
            shards_message = gr.Markdown(elem_id="shards-message")
        with gr.Tab("Leave one out", elem_id="tab-loo"):
            gr.Markdown("The full soup and the soup without each shard in turn (the paper's unlearning experiment), each labelled with how far it moved: mean absolute pixel change and RMS weight change.")
            loo_button = gr.Button("Leave one out", elem_id="loo-run")
            loo_gallery = gr.Gallery(label="Leave one out", columns=6, height=320, object_fit="contain", format="png", elem_id="loo-gallery", elem_classes=["pixelated"], allow_preview=False)
        with gr.Tab("Interpolate / grid", elem_id="tab-interp"):
            with gr.Row():
                interp_from = gr.Textbox(label="From (a shard, a mix a=0.5,b=0.5, or 'soup')", value="soup")
                interp_to = gr.Textbox(label="To", elem_id="interp-to")
                interp_count = gr.Slider(2, 16, value=5, step=1, label="Images")
                interp_button = gr.Button("Interpolate")
            interp_gallery = gr.Gallery(label="Interpolation", columns=8, height=260, object_fit="contain", format="png", elem_classes=["pixelated"], allow_preview=False)
            with gr.Row():
                grid_x = gr.Textbox(label="X axis", value="seed=0,1,2", info="weight:SHARD=0,0.5,1 | seed=0,1 | prompt=a|b | guidance=1,4 | steps=5,20")
                grid_y = gr.Textbox(label="Y axis", value="guidance=2,5")
                grid_button = gr.Button("Grid")
            grid_image = gr.Image(label="Grid", type="pil", format="png", elem_classes=["pixelated"])
        with gr.Tab("Ensemble reference", elem_id="tab-ensemble"):
            gr.Markdown(
                "The paper's Proposition: the soup approximately samples from the geometric mean of the shards' "
                "distributions, whose score is the weighted sum of their scores. The ensemble render uses that sum at "
                "every step: **one UNet call per component per step**, so it costs N times a soup render."
            )
            ens_button = gr.Button("Render ensemble and soup")
            ens_gallery = gr.Gallery(label="Ensemble vs soup", columns=2, height=300, object_fit="contain", format="png", elem_classes=["pixelated"], allow_preview=False)
        with gr.Tab("Recipe / export", elem_id="tab-export"):
            with gr.Row():
                out_name = gr.Textbox("soup", label="File name")
                out_overwrite = gr.Checkbox(False, label="overwrite if it exists")
            with gr.Row():
                recipe_button = gr.Button("Save recipe (.yaml)")
                export_button = gr.Button("Export soup UNet (.safetensors)")
                pipeline_button = gr.Button("Export pipeline folder")
            recipe_upload = gr.File(label="Load a recipe", file_types=[".yaml", ".yml"], type="filepath")
            export_file = gr.File(label="Written file", interactive=False)
            export_message = gr.Markdown()

    @user_errors
    def on_add(name, path_text, upload, *values):
        studio = job(values)[0]
        if not name.strip():
            raise ValueError("give the new shard a name")
        if upload:
            target = host.new_file("uploads", name, ".safetensors")
            shutil.copyfile(upload, target)  # keep the upload: Gradio's copy is temporary
            path = target
        elif path_text.strip():
            path = host.allowed_path(path_text)
        else:
            raise ValueError("give a path or upload a .safetensors file")
        studio.add_shard(name.strip(), path, 1.0, f"added from {path}")
        return [*shard_updates(studio), f"added shard **{html.escape(name.strip())}** from `{path}`"]

    @user_errors
    def on_remove(name, *values):
        studio = job(values)[0]
        studio.remove_shard(name.strip())
        return [*shard_updates(studio), f"removed shard **{html.escape(name.strip())}** from this session (its file is untouched)"]

    @user_errors
    def on_save_preset(file_name, overwrite, *values):
        from .presets import preset_data, write_yaml_atomic

        studio = job(values)[0]
        shards = [ShardSpec(name=s.name, path=s.path, weight=s.weight, description=s.description) for s in studio.shards.values()]
        path = host.new_file("presets", file_name, ".yaml", overwrite)
        write_yaml_atomic(preset_data(studio.preset.model_copy(update={"shards": shards}), path.parent), path, overwrite=True)
        return f"saved the preset to `{path}`"

    shard_inputs = job_inputs
    add_button.click(on_add, [add_name, add_path, add_file, *shard_inputs], [*shard_outputs, shards_message], **render_opts)
    remove_button.click(on_remove, [remove_name, *shard_inputs], [*shard_outputs, shards_message], **render_opts)
    preset_button.click(on_save_preset, [preset_file, preset_overwrite, *shard_inputs], [shards_message], **render_opts)

    @user_errors
    def on_loo(*values, progress=gr.Progress()):
        studio, mix, _, _, settings = job(values)
        results = workflows.leave_one_out(studio, mix, settings, lambda f, d: progress(f, desc=d))
        return gr.Gallery(value=[(r.image, r.label) for r in results], columns=len(results))

    @user_errors
    def on_interpolate(start, end, count, *values, progress=gr.Progress()):
        studio, mix, _, _, settings = job(values)
        ends = [mix if text.strip() in ("", "soup") else parse_api_mix(text) for text in (start, end)]
        results = workflows.interpolate(studio, ends[0], ends[1], int(count), settings, lambda f, d: progress(f, desc=d))
        return gr.Gallery(value=[(r.image, r.label) for r in results], columns=len(results))

    @user_errors
    def on_grid(x_text, y_text, *values, progress=gr.Progress()):
        studio, mix, _, _, settings = job(values)
        x, y = workflows.Axis.parse(x_text), workflows.Axis.parse(y_text)
        rows, row_labels, col_labels = workflows.grid(studio, mix, settings, x, y, lambda f, d: progress(f, desc=d))
        return grid_sheet([[r.image for r in row] for row in rows], row_labels, col_labels)

    @user_errors
    def on_ensemble(*values):
        studio, mix, _, _, settings = job(values)
        ens, soup_image = workflows.ensemble(studio, mix, settings)
        return [(ens.image, ens.label), (soup_image.image, soup_image.label)]

    loo_button.click(on_loo, job_inputs, [loo_gallery], **render_opts)
    interp_button.click(on_interpolate, [interp_from, interp_to, interp_count, *job_inputs], [interp_gallery], **render_opts)
    grid_button.click(on_grid, [grid_x, grid_y, *job_inputs], [grid_image], **render_opts)
    ens_button.click(on_ensemble, job_inputs, [ens_gallery], **render_opts)

    @user_errors
    def on_save_recipe(file_name, overwrite, *values):
        studio, mix, mode_, scale_, settings = job(values)
        studio.mix_key(mix, mode_, scale_)  # validate before writing
        path = host.new_file("recipes", file_name, ".yaml", overwrite)
        save_recipe(Recipe(preset=studio.preset.source, mix=mix, mode=mode_, scale=scale_, render=settings), path, overwrite=True)
        return path, f"saved the recipe to `{path}`"

    @user_errors
    def on_export(file_name, overwrite, *values):
        studio, mix, mode_, scale_, _ = job(values)
        studio.mix_key(mix, mode_, scale_)
        path = host.new_file("exports", file_name, ".safetensors", overwrite)
        studio.export(mix, path, mode_, scale_)
        return path, f"wrote `{path}` ({studio.label(mix, mode_, scale_)})"

    @user_errors
    def on_export_pipeline(file_name, overwrite, *values):
        studio, mix, mode_, scale_, _ = job(values)
        folder = host.new_file("pipelines", file_name, "", overwrite=False)
        studio.export_pipeline(mix, folder, mode_, scale_)
        return None, f"wrote the pipeline folder `{folder}`; load it with `StableDiffusionPipeline.from_pretrained`"

    @user_errors
    def on_load_recipe(path, preset_name):
        from .presets import load_recipe

        names_ = list(host.get(preset_name).shards)[:MAX_SHARDS]
        if not path:
            return [gr.skip()] * (2 * MAX_SHARDS + 2 + len(settings_inputs) + 1)
        recipe = load_recipe(path)
        unknown = [n for n in recipe.mix if n not in names_]
        if unknown:
            raise ValueError(f"the recipe names shards this preset does not have: {', '.join(unknown)}")
        flags = [gr.Checkbox(value=n in recipe.mix) for n in names_] + [gr.skip()] * (MAX_SHARDS - len(names_))
        weights = [gr.Slider(value=recipe.mix.get(n, 0.0)) for n in names_] + [gr.skip()] * (MAX_SHARDS - len(names_))
        r = recipe.render
        return [*flags, *weights, recipe.mode, recipe.scale, r.prompt, r.negative_prompt, r.seed, r.steps, r.guidance_scale,
                r.scheduler, r.height, r.width, f"loaded recipe `{Path(path).name}`"]

    checks_and_sliders = job_inputs[3 : 3 + 2 * MAX_SHARDS]
    recipe_button.click(on_save_recipe, [out_name, out_overwrite, *job_inputs], [export_file, export_message], **render_opts)
    export_button.click(on_export, [out_name, out_overwrite, *job_inputs], [export_file, export_message], **render_opts)
    pipeline_button.click(on_export_pipeline, [out_name, out_overwrite, *job_inputs], [export_file, export_message], **render_opts)
    recipe_upload.upload(
        on_load_recipe, [recipe_upload, preset], [*checks_and_sliders, mode, scale, *settings_inputs, export_message],
        api_visibility="private",
    ).then(**redraw_mixture, api_visibility="private")


def build_api(host: StudioHost) -> None:
    """Named endpoints for gradio_client: `/mix` and `/render` (mix given as "a=0.5,b=0.5")."""
    with gr.Group(visible=False):
        api_preset = gr.Textbox(label="preset")
        api_mix = gr.Textbox(label="mix")
        api_settings = [
            gr.Textbox(label="prompt"),
            gr.Textbox(label="negative_prompt"),
            gr.Number(0, label="seed", precision=0),
            gr.Number(20, label="steps", precision=0),
            gr.Number(5.0, label="guidance_scale"),
            gr.Textbox("dpm++", label="scheduler"),
            gr.Number(64, label="height", precision=0),
            gr.Number(64, label="width", precision=0),
        ]
        api_gallery = gr.Gallery(label="images", format="png")
        api_info = gr.JSON(label="info")
        mix_button = gr.Button("mix")
        render_button = gr.Button("render")

    @user_errors
    def api_mix_fn(preset_name, mix_text):
        """Normalize a mix and return its recipe (shard names, content hashes, weights) and label."""
        studio = host.get(preset_name or None)
        mix = parse_api_mix(mix_text)
        return {"label": studio.mix(mix), "recipe": studio.recipe(mix)}

    @user_errors
    def api_render_fn(preset_name, mix_text, *settings):
        """Render every component of the mix and the soup; images are labelled, the soup last."""
        studio = host.get(preset_name or None)
        mix = parse_api_mix(mix_text)
        results = studio.render(mix, settings_from(*settings))
        info = {"labels": [r.label for r in results], "recipe": studio.recipe(mix)}
        return [(r.image, r.label) for r in results], info

    mix_button.click(api_mix_fn, [api_preset, api_mix], [api_info], api_name="mix", concurrency_id="render")
    render_button.click(
        api_render_fn, [api_preset, api_mix, *api_settings], [api_gallery, api_info], api_name="render", concurrency_id="render"
    )


def launch(demo: gr.Blocks, port: int | None = None, share: bool = False, **kwargs):
    """Serve on 127.0.0.1 only, with no share link unless asked."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name="127.0.0.1", server_port=port, share=share, css=CSS, show_error=True, **kwargs)
