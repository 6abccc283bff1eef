"""The Gradio page: thin handlers that turn widget values into one Studio call each."""

from __future__ import annotations

import functools
import html
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from pydantic import ValidationError

from .presets import SCHEDULERS, RenderSettings, describe_validation_error, load_preset
from .studio import RuntimeOptions, Studio

logger = logging.getLogger(__name__)

MAX_SHARDS = 12  # shard rows on the page; rows beyond the loaded shards stay hidden

CSS = """
#soup-image { border: 4px solid #d66212; border-radius: 10px; }
#soup-label { color: #d66212; font-weight: 600; }
.pixelated img { image-rendering: pixelated; }
#soup-image img { width: 100%; height: 100%; object-fit: contain; }
.mixture-bar { display: flex; height: 22px; border-radius: 5px; overflow: hidden; margin: 4px 0; }
.mixture-bar div { color: white; font-size: 11px; line-height: 22px; text-align: center; overflow: hidden; white-space: nowrap; }
"""
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b"]


class StudioHost:
    """The presets offered by the page and a Studio per preset, loaded on first use."""

    def __init__(self, presets: list[Path], options: RuntimeOptions = RuntimeOptions(), loader: Callable = Studio):
        if not presets:
            raise ValueError("no preset to serve")
        self.presets = {p.stem: Path(p) for p in presets}
        self.options = options
        self.loader = loader
        self._studios: dict[str, Studio] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, name: str, studio) -> "StudioHost":
        """A host serving one already-loaded studio (tests pass tiny or fake backends this way)."""
        host = cls([Path(f"{name}.yaml")], loader=lambda *a, **k: studio)
        host._studios[name] = studio
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
        names = gr.State([])  # shard name shown in each row, per session
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
        mix_inputs = [preset, names, *checks, *sliders]

        def current_mix(names_, values):
            flags, weights = values[:MAX_SHARDS], values[MAX_SHARDS:]
            return {n: float(weights[i]) for i, n in enumerate(names_) if flags[i]}

        @user_errors
        def on_preset(name, progress=gr.Progress()):
            studio = host.get(name, lambda f, d: progress(f, desc=d))
            shards = list(studio.shards.values())[:MAX_SHARDS]
            r = studio.preset.render
            first = r.prompt or (r.prompts[0] if r.prompts else "")
            failed = "".join(f"\n\n⚠️ shard **{n}** left out: {html.escape(why)}" for n, why in studio.failed.items())
            updates = [
                [s.name for s in shards],
                f"**{studio.preset.name or name}**: {html.escape(studio.preset.description)}"
                f" ({len(shards)} shards on {studio.device}, {str(studio.dtype).removeprefix('torch.')}){failed}",
            ]
            updates += [gr.Group(visible=i < len(shards)) for i in range(MAX_SHARDS)]
            updates += [gr.Checkbox(value=True, label=s.name) for s in shards]
            updates += [gr.Checkbox(value=False) for _ in range(MAX_SHARDS - len(shards))]
            updates += [gr.Slider(value=s.weight) for s in shards] + [gr.Slider(value=0) for _ in range(MAX_SHARDS - len(shards))]
            updates += [gr.Markdown(s.description) for s in shards] + [gr.Markdown("") for _ in range(MAX_SHARDS - len(shards))]
            updates += [
                mixture_html([s.name for s in shards], [s.weight for s in shards]),
                gr.Dropdown(choices=r.prompts, value=first if first in r.prompts else None),
                first, r.negative_prompt, r.seed, r.steps, r.guidance_scale, r.scheduler, r.height, r.width,
            ]
            return updates

        preset_outputs = [names, status, *rows, *checks, *checks[:0], *sliders, *notes, mixture, examples, *settings_inputs]

        def on_mixture(name, names_, *values):
            mix = current_mix(names_, values)
            return mixture_html(list(mix), list(mix.values()))

        @user_errors
        def on_generate(name, names_, *values, progress=gr.Progress()):
            studio = host.get(name)
            mix = current_mix(names_, values[: 2 * MAX_SHARDS])
            settings = settings_from(*values[2 * MAX_SHARDS :])
            results = studio.render(mix, settings, lambda f, d: progress(f, desc=d))
            parts, hybrid = results[:-1], results[-1]
            return (
                gr.Gallery(value=[(r.image, r.label) for r in parts], columns=max(1, len(parts))),
                gr.Image(value=hybrid.image, label=hybrid.label),
                hybrid.label,
            )

        @user_errors
        def on_hybrid(name, names_, *values):
            studio = host.get(name)
            mix = current_mix(names_, values[: 2 * MAX_SHARDS])
            hybrid = studio.render_soup(mix, settings_from(*values[2 * MAX_SHARDS :]))
            return gr.Image(value=hybrid.image, label=hybrid.label), hybrid.label

        def on_uniform(names_, *flags):
            return [gr.Slider(value=1.0 if i < len(names_) and flags[i] else s) for i, s in enumerate([0.0] * MAX_SHARDS)]

        # Events. Generate renders everything (components come from the cache when unchanged);
        # releasing a slider or toggling a shard re-renders the soup once, for the last value only.
        demo.load(on_preset, [preset], preset_outputs, api_visibility="private")
        preset.input(on_preset, [preset], preset_outputs, api_visibility="private")
        examples.input(lambda p: p, [examples], [prompt], api_visibility="private")
        randomize.click(lambda: random.randint(0, 2**31 - 1), None, [seed], api_visibility="private")
        full = dict(fn=on_generate, inputs=mix_inputs + settings_inputs, outputs=[components, soup_image, soup_label])
        generate.click(**full, api_visibility="private", concurrency_id="render")
        for check in checks:
            check.input(on_mixture, mix_inputs, [mixture], api_visibility="private", trigger_mode="always_last").then(
                **full, api_visibility="private", trigger_mode="always_last", concurrency_id="render"
            )
        for slider in sliders:
            slider.change(on_mixture, mix_inputs, [mixture], api_visibility="private", trigger_mode="always_last", show_progress="hidden")
            slider.release(
                on_hybrid, mix_inputs + settings_inputs, [soup_image, soup_label],
                api_visibility="private", trigger_mode="always_last", concurrency_id="render",
            )
        uniform.click(on_uniform, [names, *checks], sliders, api_visibility="private").then(
            on_mixture, mix_inputs, [mixture], api_visibility="private"
        ).then(on_hybrid, mix_inputs + settings_inputs, [soup_image, soup_label], api_visibility="private", concurrency_id="render")

        build_api(host)
    return demo


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
