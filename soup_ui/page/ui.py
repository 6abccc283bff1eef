"""The Gradio page: widgets wired to the plain handlers of `session.py`, one session state each."""

from __future__ import annotations

import functools
import html
import logging
import random
import time
import typing
from pathlib import Path

import gradio as gr

from ..maths.methods import METHODS
from ..maths.soup import rounded_shares
from ..modelfiles.presets import SCHEDULERS, parse_blocks, parse_params
from . import session as handlers
from .session import MAX_SHARDS, Controls, Session, StudioHost, settings_from
from .widgets import TypedSlider

logger = logging.getLogger(__name__)

__all__ = ["StudioHost", "build_ui", "launch", "MAX_SHARDS"]

CSS = """
#soup-image { border: 4px solid #d66212; border-radius: 10px; }
#soup-label, #soup-label * { color: #d66212 !important; font-weight: 600; }
#stale-note { color: #b3261e; }
.pixelated img { image-rendering: pixelated; }
/* Component tiles no larger than the soup: Gradio stretches few items over the row, taller than the gallery. */
#components .grid-container { grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)) !important; }
#soup-image img { width: 100%; height: 100%; object-fit: contain; }
.mixture-bar { display: flex; height: 22px; border-radius: 5px; overflow: hidden; margin: 4px 0; }
.mixture-bar div { color: white; font-size: 11px; line-height: 22px; text-align: center; overflow: hidden; white-space: nowrap; }
.error-line { color: #b3261e; font-weight: 600; }
/* Gallery captions wrap instead of being cut ("t=0.25: soup: 0.75 twemoji + 0.2..."); ensemble images fit the viewport. */
.gallery-item .caption-label, .thumbnail-item .caption-label { white-space: normal !important; overflow: visible !important; text-overflow: clip !important; max-width: none !important; }
#ens-gallery img { max-height: 60vh; }
/* The history strip: small thumbnails in a row, not two stretched over the page. */
#history .grid-container { grid-template-columns: repeat(auto-fill, 92px) !important; grid-auto-rows: 92px !important; }
.blocks-picture table { border-collapse: separate; border-spacing: 2px; table-layout: fixed; width: auto; border: none; }
.blocks-picture td, .blocks-picture th { border: none !important; background: none; }
.blocks-picture td { width: 14px; min-width: 14px; height: 20px; border-radius: 3px; padding: 0; }
.blocks-picture th { font-size: 9px; font-weight: 400; padding: 0 0 2px 0; vertical-align: bottom; }
.blocks-picture th span { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; }
.blocks-picture th.who { font-size: 11px; text-align: right; padding-right: 4px; white-space: nowrap; }
#history .thumbnail-item .caption-label { white-space: nowrap !important; overflow: hidden !important; text-overflow: ellipsis !important; max-width: 84px !important; font-size: 10px; }
"""
# Gradio's slider number box commits a typed value only on blur; Enter should commit it too (weights, method parameters).
JS = """
() => {
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (e.key === 'Enter' && t instanceof HTMLInputElement && t.type === 'number' && t.closest('[id^="shard-weight-"], [id^="param-"]')) {
      t.blur();
    }
  }, true);
}
"""
MAX_BLOCKS = 64  # block sliders in the block editor (FLUX.1 has 63 blocks)
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b"]


def user_errors(fn):
    """Show library errors as a readable message in the page; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, KeyError, FileExistsError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise gr.Error(str(message), print_exception=False) from None
        except Exception as err:  # a bug: log it whole, show one line
            logger.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error: {type(err).__name__}: {err}", print_exception=False) from None

    return wrapper


def in_place(outputs: int):
    """A handler whose refusal (a bad setting, mix or axis: ValueError, KeyError) is shown once, in
    the message line after its `outputs`, which keep what they showed (it was a toast, and an "Error"
    pill that wiped the previous result); other errors as `user_errors`."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)  # its outputs and the message line (empty when all went well)
            except (ValueError, KeyError) as err:
                return [gr.skip()] * outputs + [error_line(err)]

        return user_errors(wrapper)

    return decorate


def with_eta(progress, clock=time.monotonic):
    """A `report(fraction, what)` for long work that shows, over the output it fills, what is being
    done, how far along it is and about how long is left (from the time per share so far)."""
    start = clock()

    def report(fraction: float, what: str) -> None:
        elapsed = clock() - start
        left = f", about {elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        progress(fraction, desc=f"{what} ({100 * fraction:.0f}%{left})")

    return report


def error_line(err: Exception) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"<span class='error-line'>❌ {html.escape(str(message))}</span>"


def mixture_html(names: list[str], weights: list[float]) -> str:
    """A bar per shard, as wide as its normalized weight (the shares shown add up to 100%)."""
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return "<div class='mixture-empty'>No shard selected with a positive weight: nothing to mix.</div>"
    shares = rounded_shares([max(w, 0) / total for w in weights])
    parts = []
    for i, (name, w, share) in enumerate(zip(names, weights, shares)):
        if w > 0:
            colour = PALETTE[i % len(PALETTE)]
            label = html.escape(f"{name} {share:.0%}")
            parts.append(f"<div style='width:{w / total * 100:.2f}%;background:{colour}' title='{label}'>{label}</div>")
    return "<div class='mixture-bar'>" + "".join(parts) + "</div>"


def method_params() -> dict:
    """Every parameter of the registered methods by its public name, with the first method's field
    for it (range, default, meaning): one page control each, shown for the methods that take it."""
    fields = {}
    for m in METHODS.values():
        for name, f in m.params.model_fields.items():
            fields.setdefault(f.alias or name, f)
    return fields


def param_control(name: str, field) -> gr.Component:
    """A control rendered from a parameter's field: a slider over its range, a whole number, a choice, or text."""
    bounds = {k: getattr(x, k) for x in field.metadata for k in ("ge", "le") if getattr(x, k, None) is not None}
    common = dict(label=name, info=field.description, visible=False, elem_id=f"param-{name}")
    if field.annotation is float:
        return TypedSlider(bounds.get("ge", 0.0), bounds.get("le", 1.0), value=field.default, step=0.01, **common)
    if field.annotation is int:
        return gr.Number(field.default, precision=0, minimum=bounds.get("ge"), maximum=bounds.get("le"), **common)
    if typing.get_origin(field.annotation) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(field.annotation)), value=field.default, **common)
    return gr.Textbox(field.default, **common)


def method_note(name: str) -> str:
    m = METHODS[name]
    return f"<small>{html.escape(m.summary)}. <i>{html.escape(m.reference)}</i></small>"


def restored(names: list[str], mix: dict[str, float], recipe, message: str) -> list:
    """Control updates for a recipe's mix and settings (a loaded file, a history image, a reloaded
    page) over the page's rows `names`: ticks, weights, method and parameters, text encoders,
    settings, block weights."""
    top = max(mix.values()) or 1.0
    mix = {n: w / top for n, w in mix.items()}  # sliders run 0-1; only the ratios matter
    blank = [gr.skip()] * (MAX_SHARDS - len(names))
    flags = [gr.Checkbox(value=n in mix) for n in names] + blank
    weights = [gr.Slider(value=mix[n]) if n in mix else gr.skip() for n in names] + blank
    r = recipe.render
    lines = [block_line(recipe.blocks.get(n)) for n in names] + [""] * (MAX_SHARDS - len(names))
    return [*flags, *weights, recipe.method, *method_updates(recipe.method, recipe.params), recipe.text_encoders, r.prompt, r.negative_prompt, r.seed, r.steps, r.guidance_scale,
            r.scheduler, r.height, r.width, *lines, message]


def block_line(value) -> str:
    """Block weights as the row's line: a recipe's list as SuperMerger's list, a spec as given, none as ""."""
    if value is None:
        return ""
    return value if isinstance(value, str) else ",".join(f"{float(v):g}" for v in value)


def method_updates(name: str, values: dict | None = None) -> list:
    """The parameter controls for method `name`: its own shown, at `values` or its defaults; the rest hidden."""
    m, values = METHODS[name], values or {}
    own = {f.alias or n: f for n, f in m.params.model_fields.items()}
    return [
        gr.update(visible=True, value=values.get(p, own[p].default)) if p in own else gr.update(visible=False)
        for p in PARAMS
    ] + [method_note(name)]


PARAM_ORDER = ("density", "epsilon", "alpha", "c", "lambda", "seed", "rng")  # what shapes the merge first, the seed last
FIELDS = method_params()
PARAMS = sorted(FIELDS, key=lambda p: PARAM_ORDER.index(p) if p in PARAM_ORDER else len(PARAM_ORDER))


def build_ui(host: StudioHost) -> gr.Blocks:
    """Declare the page and wire its events; `host` provides the studios, `session.py` the logic."""
    with gr.Blocks(title="Diffusion Soup Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        state = gr.State(None, delete_callback=lambda s: handlers.close_session(host, s))
        gr.Markdown(
            "# Diffusion Soup Studio\nMix finetuned denoisers (UNets, transformers) by averaging their weights "
            "([Diffusion Soup](https://arxiv.org/abs/2406.08431)): pick shards and weights, and compare each "
            "component with the hybrid, all rendered from the same noise."
        )
        with gr.Row():
            preset = gr.Dropdown(list(host.presets), value=host.default, label="Preset", scale=1, interactive=False, elem_id="preset")
            status = gr.Markdown("Loading the preset...", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### Shards")
                rows, checks, sliders, notes, block_lines, block_presets = [], [], [], [], [], []
                for i in range(MAX_SHARDS):
                    with gr.Group(visible=False) as row:
                        check = gr.Checkbox(value=True, label=f"shard {i}", elem_id=f"shard-check-{i}")
                        slider = TypedSlider(0.0, 1.0, value=1.0, step=0.05, label="weight", elem_id=f"shard-weight-{i}")
                        note = gr.Markdown()
                        with gr.Accordion("blocks", open=False, elem_id=f"shard-blocks-box-{i}"):
                            with gr.Row():
                                line = gr.Textbox(label="block weights (Enter applies; empty: all 1)", scale=3, elem_id=f"shard-blocks-{i}",
                                                  info="one value per block in order (SuperMerger's list), or NAME:VALUE pairs, e.g. IN:0,OUT:1")
                                preset_pick = gr.Dropdown([], value=None, label="preset", scale=1, elem_id=f"shard-blocks-preset-{i}")
                    rows.append(row)
                    checks.append(check)
                    sliders.append(slider)
                    notes.append(note)
                    block_lines.append(line)
                    block_presets.append(preset_pick)
                mixture = gr.HTML(elem_id="mixture")
                uniform = gr.Button("Uniform (the paper's uniform soup)", elem_id="uniform")
                with gr.Accordion("Block weights: where in the denoiser each shard acts", open=False, elem_id="blocks-panel"):
                    blocks_picture = gr.HTML(elem_id="blocks-picture")
                    block_shard = gr.Dropdown([], value=None, label="Edit the blocks of (a slider per block; release applies)", elem_id="blocks-shard")
                    with gr.Row(elem_id="block-sliders"):
                        block_sliders = [gr.Slider(0.0, 1.0, value=1.0, step=0.05, label=f"block {j}", visible=False, min_width=90,
                                                   elem_id=f"block-slider-{j}") for j in range(MAX_BLOCKS)]
                method = gr.Dropdown(list(METHODS), value="average", label="Merge method", elem_id="method")
                note = gr.HTML(method_note("average"), elem_id="method-note")
                params = [param_control(name, FIELDS[name]) for name in PARAMS]
                text_mix = gr.Checkbox(
                    False, label="Mix text encoders too", elem_id="mix-text-encoders",
                    info="the shards' own text encoders (full checkpoints, pipeline folders) with the same weights; a shard without one counts as the base's",
                )
            with gr.Column(scale=1):
                examples = gr.Dropdown([], label="Example prompts", interactive=True, elem_id="examples")
                prompt = gr.Textbox(label="Prompt (Enter renders)", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    randomize = gr.Button("Randomize seed", size="sm", elem_id="randomize")
                with gr.Row():
                    steps = gr.Number(20, label="Steps (1-150)", precision=0, elem_id="steps")
                    guidance = gr.Number(5.0, label="Guidance scale (0-30)", elem_id="guidance")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="Scheduler")
                with gr.Row():
                    height = gr.Number(64, label="Height", precision=0, elem_id="height")
                    width = gr.Number(64, label="Width", precision=0, elem_id="width")
                generate = gr.Button("Generate", variant="primary", elem_id="generate", interactive=False)
        with gr.Row(equal_height=True):
            with gr.Column(scale=3):
                gr.Markdown("**Components**")
                components = gr.Gallery(
                    show_label=False, columns=4, height=300, object_fit="contain", elem_id="components",
                    elem_classes=["pixelated"], allow_preview=False, format="png", buttons=["download"],
                )
                stale = gr.Markdown(elem_id="stale-note")
            with gr.Column(scale=0, min_width=260):
                soup_label = gr.Markdown("**Soup**", elem_id="soup-label")
                soup_image = gr.Image(
                    show_label=False, type="filepath", format="png", height=256, elem_id="soup-image",
                    elem_classes=["pixelated"], buttons=["download", "fullscreen"], interactive=False,
                )
                download_all = gr.Button("Download all (zip: components, soup, recipe)", size="sm", elem_id="download-all")
                download_file = gr.File(show_label=False, interactive=False, elem_id="download-all-file", height=60, visible=False)
        saved = gr.BrowserState(None, storage_key="diffusion-soup-studio")  # what survives a reload: preset, last mix, added shards
        restoring = gr.State(False)
        history = gr.Gallery(label="History of this page's soups (click one to go back to its mix and settings)", columns=12, height=130,
                             object_fit="contain", allow_preview=False, format="png", elem_id="history", elem_classes=["pixelated"])

        settings_inputs = [prompt, negative, seed, steps, guidance, scheduler, height, width]
        control_inputs = [method, *params, text_mix, *checks, *sliders, *settings_inputs, *block_lines]
        job_inputs = [state, *control_inputs]
        shard_outputs = [*rows, *checks, *sliders, *notes, mixture, *block_lines, *block_presets]

        def controls_from(values) -> Controls:
            """Typed controls from the values of `control_inputs`."""
            n = len(PARAMS)
            method_, given, text_ = values[0], dict(zip(PARAMS, values[1 : 1 + n])), values[1 + n]
            rest = values[2 + n :]
            flags = tuple(bool(v) for v in rest[:MAX_SHARDS])
            weights = tuple(float(v or 0.0) for v in rest[MAX_SHARDS : 2 * MAX_SHARDS])
            chosen = tuple((p, given[p]) for p in METHODS[method_].param_names()) if method_ in METHODS else ()
            settings_end = 2 * MAX_SHARDS + len(settings_inputs)
            lines = tuple(str(v or "") for v in rest[settings_end : settings_end + MAX_SHARDS])
            return Controls(flags, weights, method_, chosen, settings_from(*rest[2 * MAX_SHARDS : settings_end]), bool(text_), lines)

        def shard_updates(session: Session, flags=None, weights=None, lines=None):
            """Rows for the session's shards, in its order (keeping given ticks, weights and block
            weights by name), with the block presets of the preset's denoiser."""
            shards = list(session.shards.values())
            flags, weights, lines = flags or {}, weights or {}, lines or {}
            blank = MAX_SHARDS - len(shards)
            ticks = [flags.get(s.name, True) for s in shards]
            values = [weights.get(s.name, s.weight) for s in shards]
            blocks = host.get(session.preset).blocks
            choices = list(blocks.presets()) if blocks is not None else []
            return [
                *[gr.Group(visible=i < len(shards)) for i in range(MAX_SHARDS)],
                *[gr.Checkbox(value=t, label=s.name) for s, t in zip(shards, ticks)], *[gr.Checkbox(value=False, label="")] * blank,
                *[gr.Slider(value=v) for v in values], *[gr.Slider(value=0)] * blank,
                *[gr.Markdown(html.escape(s.description) + (" *(has its own text encoder)*" if s.weights.text_kind else "")) for s in shards],
                *[gr.Markdown("")] * blank,
                mixture_html([s.name for s in shards], [v if t else 0 for t, v in zip(ticks, values)]),
                *[lines.get(s.name, "") for s in shards], *[""] * blank,
                *[gr.Dropdown(choices=choices, value=None) for _ in range(MAX_SHARDS)],
            ]

        def current(session: Session, values) -> tuple[dict, dict, dict]:
            """The ticks, weights and block weights shown, by shard name (values: checks, sliders and
            block lines; without the lines, none)."""
            names = session.names
            lines = {n: values[2 * MAX_SHARDS + i] or "" for i, n in enumerate(names)} if len(values) >= 3 * MAX_SHARDS else {}
            return ({n: bool(values[i]) for i, n in enumerate(names)}, {n: float(values[MAX_SHARDS + i] or 0) for i, n in enumerate(names)}, lines)

        @user_errors
        def on_preset(name, old, progress=gr.Progress()):
            try:
                session = handlers.open_session(host, name, old, lambda f, d: progress(f, desc=d))
            except (ValueError, KeyError, OSError) as err:
                if old is None:  # nothing to go back to
                    raise
                # The page stays on the preset it had (rows, images, the dropdown itself), the reason in place.
                kept = [gr.skip()] * len(preset_outputs)
                kept[preset_outputs.index(preset)] = gr.Dropdown(value=old.preset)
                kept[preset_outputs.index(status)] = status_line(old) + "\n\n" + error_line(ValueError(f"preset {name!r} not loaded: {err}"))
                return kept
            studio = host.get(session.preset)
            r = studio.preset.render
            first = r.prompt or (r.prompts[0] if r.prompts else "")
            panel = panel_updates(session, None, {})
            return [
                session,
                *shard_updates(session),
                status_line(session),
                gr.Dropdown(choices=r.prompts, value=first if first in r.prompts else None),
                first, *family_controls(studio, r), r.height, r.width,
                gr.Button(interactive=True), gr.Dropdown(choices=list(host.presets), interactive=True),  # with presets saved since the page was built
                None, None, "**Soup**", "", studio.preset.mix_text_encoders, [],  # a new session: a new history
                panel[0], picture_of(session, {n: True for n in session.names}, {}), *panel[1:],  # the block editor, the picture
            ]

        def picture_of(session: Session, flags: dict, lines: dict) -> str:
            ticked = [n for n in session.names if flags.get(n)]
            colours = [PALETTE[session.names.index(n) % len(PALETTE)] for n in ticked]  # each row's colour in the mixture bar
            return handlers.blocks_picture(host.get(session.preset).blocks, ticked, lines, colours)

        def on_picture(session, *values):
            """The block picture of the ticked rows (values: checks, sliders, block lines)."""
            if session is None:
                return gr.skip()
            flags, _, lines = current(session, values)
            return picture_of(session, flags, lines)

        def panel_updates(session: Session, name: str | None, lines: dict) -> list:
            """The block editor for one shard (default: the first): a slider per block of this
            denoiser at its current values, labelled with the block IDs."""
            blocks = host.get(session.preset).blocks
            ids = blocks.ids if blocks is not None else ()
            name = name if name in session.shards else (session.names[0] if session.names else None)
            vector = (1.0,) * len(ids)
            if blocks is not None and name and (lines.get(name) or "").strip():
                vector, _ = handlers.block_vectors(blocks, {name: lines[name]})
                vector = vector.get(name, (1.0,) * len(ids))
            return [gr.Dropdown(choices=session.names, value=name),
                    *[gr.Slider(label=b, value=min(1.0, v), visible=True) for b, v in zip(ids, vector)],
                    *[gr.Slider(visible=False)] * (MAX_BLOCKS - len(ids))]

        def on_block_shard(name, session, *values):
            if session is None:
                return [gr.skip()] * MAX_BLOCKS
            _, _, lines = current(session, values)
            return panel_updates(session, name, lines)[1:]

        def on_follow(index, session, *values):
            """The block editor turns to the row whose line just changed, its sliders at that line's values."""
            if session is None or index >= len(session.names):
                return [gr.skip()] * (1 + MAX_BLOCKS)
            _, _, lines = current(session, values)
            return panel_updates(session, session.names[index], lines)

        def on_block_slider(session, name, *values):
            """The shard's line, written from the sliders (the other rows' lines stay)."""
            if session is None or name not in session.shards:
                return [gr.skip()] * MAX_SHARDS
            blocks = host.get(session.preset).blocks
            line = blocks.format(values[: len(blocks)])
            index = session.names.index(name)
            return [line if i == index else gr.skip() for i in range(MAX_SHARDS)]

        def on_block_preset(session, choice):
            blocks = host.get(session.preset).blocks if session is not None else None
            vector = blocks.presets().get(choice) if blocks is not None else None
            return gr.skip() if vector is None else blocks.format(vector)

        def status_line(session) -> str:
            """The preset line: name, description, this page's shard count (kept current as shards
            are added and removed), family, device and memory plan, and shards left out."""
            studio = host.get(session.preset)
            failed = "".join(f"\n\n⚠️ shard **{n}** left out: {html.escape(why)}" for n, why in studio.failed.items())
            lean = ", lean mode (shards streamed from disk)" if studio.lean else ""
            lean += f"<br><small>memory: {html.escape(studio.memory_plan)}</small>"
            return (f"**{studio.preset.name or session.preset}**: {html.escape(studio.preset.description)}"
                    f" ({len(session.shards)} shards; {studio.renderer.family_name}: {type(studio.pipe).__name__}, soups its {studio.kind.denoiser};"
                    f" {studio.runs_on}{lean}){failed}")

        def family_controls(studio, r) -> list:
            """Negative prompt, seed, steps, guidance and scheduler as the family takes them: the negative
            prompt only where classifier-free guidance applies (not FLUX.1), FLUX.1 dev's guidance is
            distilled (an input of the model) and schnell's unused, SD3 and FLUX.1 sample with their
            own flow-matching scheduler only."""
            applies = studio.kind.negative_prompt
            guidance = {None: "Guidance scale (0-30)", True: "Distilled guidance (FLUX.1 dev, 0-30)", False: "Guidance (unused by FLUX.1 schnell)"}
            schedulers = ["default"] if studio.kind.flow_matching else list(SCHEDULERS)
            return [
                gr.Textbox(value=r.negative_prompt if applies else "", visible=applies), r.seed, r.steps,
                gr.Number(value=r.guidance_scale, label=guidance[studio.renderer.guidance_distilled], interactive=studio.renderer.guidance_distilled is not False),
                gr.Dropdown(choices=schedulers, value=r.scheduler),
            ]

        def on_mixture(session, *values):
            if session is None:
                return gr.skip()
            flags, weights, _ = current(session, values)
            return mixture_html(list(flags), [weights[n] if flags[n] else 0 for n in flags])

        def show(images: handlers.Images, session: Session):
            if images.superseded:  # a newer click of this page is on its way: keep what is shown
                return [gr.skip()] * 6
            if images.empty:  # the last images stay, marked as such
                return gr.skip(), gr.skip(), "**Soup**: nothing to mix", gr.skip(), gr.skip(), images.note
            gallery = gr.skip() if images.components is None else gr.Gallery(value=images.components, columns=max(1, len(images.components)))
            path, caption = images.soup
            return gallery, gr.Image(value=path), caption, [(p, c) for p, c, _ in session.history], handlers.saved_state(session), images.note

        @in_place(5)  # a refused setting or mix: said under the images, which stay
        def on_generate(session, *values, progress=gr.Progress()):
            return show(handlers.generate(host, session, controls_from(values), with_eta(progress)), session)

        @in_place(5)
        def on_soup(session, *values):
            return show(handlers.render_soup(host, session, controls_from(values)), session)

        def on_uniform(session, *flags):
            # Every row gets the same weight, ticked or not, so a row ticked later joins the soup equally.
            return [gr.Slider(value=1.0) for _ in flags]

        def on_tick(session, *values):
            """Ticking a row whose weight is 0 gives it weight 1, so that it is in the soup it is shown beside."""
            flags, weights = values[:MAX_SHARDS], values[MAX_SHARDS:]
            return [gr.Slider(value=1.0) if f and not w else gr.skip() for f, w in zip(flags, weights)]

        # Events. Generate renders everything (components come from the cache when unchanged);
        # releasing a slider or changing the mode re-renders the soup (and the components, when the
        # settings changed since they were rendered), once, for the last value only.
        quiet = dict(api_visibility="private")
        render_opts = dict(api_visibility="private", trigger_mode="always_last", concurrency_id="render", concurrency_limit=host.render_slots)
        mixture_inputs = [state, *checks, *sliders]
        render_outputs = [components, soup_image, soup_label, history, saved, stale]
        preset_outputs = [state, *shard_outputs, status, examples, *settings_inputs, generate, preset, components, soup_image, soup_label, stale, text_mix, history,
                          block_shard, blocks_picture, *block_sliders]
        # A reload comes back as it was: the browser's saved preset, then its added shards, then its
        # mix and settings, rendered (nothing happens when nothing was saved).
        restore_outputs = [*checks, *sliders, method, *params, note, text_mix, *settings_inputs, *block_lines]
        row_inputs = [state, *checks, *sliders, *block_lines]  # what `current` reads: ticks, weights, block lines
        picture = dict(fn=on_picture, inputs=row_inputs, outputs=[blocks_picture], **quiet, show_progress="hidden")  # the block picture follows

        def on_pick(saved_value):
            name = (saved_value or {}).get("preset")
            return gr.Dropdown(value=name) if name in host.presets else gr.skip()

        def on_restore_shards(session, saved_value, *values):
            if not saved_value or session is None:
                return [gr.skip()] * (1 + len(shard_outputs) + 1)
            flags, weights, lines = current(session, values)
            lost = handlers.restore_shards(host, session, saved_value)
            note = "".join(error_line(ValueError(f"not restored: {line}")) for line in lost)
            return [session, *shard_updates(session, flags, weights, lines), note or gr.skip()]

        def on_restore_controls(session, saved_value):
            found = handlers.saved_recipe(session, saved_value) if session is not None else None
            if found is None:
                return [gr.skip()] * len(restore_outputs) + [False]
            return [*restored(session.names, *found, "")[:-1], True]

        def on_restored_render(flag, session, *values, progress=gr.Progress()):
            return on_generate(session, *values, progress=progress) if flag else [gr.skip()] * len(render_outputs)

        unseen = dict(**quiet, show_progress="hidden")  # no timer over the rows and images while nothing is restored
        demo.load(on_pick, [saved], [preset], **unseen).then(on_preset, [preset, state], preset_outputs, show_progress_on=[status], **quiet).then(
            on_restore_shards, [state, saved, *checks, *sliders, *block_lines], [state, *shard_outputs, stale], **unseen
        ).then(on_restore_controls, [state, saved], [*restore_outputs, restoring], **unseen).then(
            on_mixture, [state, *checks, *sliders], [mixture], **unseen
        ).then(**picture).then(
            on_restored_render, [restoring, *job_inputs], render_outputs, **unseen)
        # Menus act when a value is chosen (select), never on a click-away (a dropdown's input event fires on blur).
        preset.select(on_preset, [preset, state], preset_outputs, show_progress_on=[status], **quiet)
        full = dict(fn=on_generate, inputs=job_inputs, outputs=render_outputs)
        examples.select(lambda p: p, [examples], [prompt], **quiet).then(**full, **render_opts)  # renders, as a slider does
        randomize.click(lambda: random.randint(0, 2**31 - 1), None, [seed], **quiet).then(**full, **render_opts)
        soup_only = dict(fn=on_soup, inputs=job_inputs, outputs=render_outputs)
        generate.click(**full, **render_opts)
        download_all.click(in_place(1)(lambda session, *values: (gr.File(value=handlers.download_all(host, session, controls_from(values)), visible=True), "")),
                           job_inputs, [download_file, stale], **render_opts)
        prompt.submit(**full, **render_opts)
        for check in checks:
            # always_last: a second click while the first one's render runs is queued, never dropped.
            check.input(on_tick, [state, *checks, *sliders], sliders, trigger_mode="always_last", **quiet).then(
                on_mixture, mixture_inputs, [mixture], **quiet
            ).then(**picture).then(**full, **render_opts)
        for slider in sliders:
            # .input, not .change: programmatic updates (preset, uniform, recipe, shards) redraw the bar themselves.
            slider.input(on_mixture, mixture_inputs, [mixture], show_progress="hidden", trigger_mode="always_last", **quiet)
            slider.release(**soup_only, **render_opts)
        # A method brings its own parameters (at their defaults), then the soup is rendered with it.
        method.select(method_updates, [method], [*params, note], **quiet).then(**soup_only, **render_opts)
        for control in params:
            if isinstance(control, gr.Slider):
                control.release(**soup_only, **render_opts)
            elif isinstance(control, gr.Dropdown):
                control.select(**soup_only, **render_opts)
            else:
                control.submit(**soup_only, **render_opts)
        text_mix.input(**full, **render_opts)  # components change too (those with their own text encoder)
        # Block weights: a row's line (Enter), its preset, or the block editor's sliders; the picture
        # follows, then the soup is rendered (a refused line: said under the images, which stay).
        for i, (line, pick) in enumerate(zip(block_lines, block_presets)):
            follow = dict(fn=functools.partial(on_follow, i), inputs=row_inputs, outputs=[block_shard, *block_sliders], **quiet, show_progress="hidden")
            line.submit(**picture).then(**follow).then(**soup_only, **render_opts)
            pick.select(on_block_preset, [state, pick], [line], **quiet).then(**picture).then(**follow).then(**soup_only, **render_opts)
        block_shard.select(on_block_shard, [block_shard, *row_inputs], block_sliders, **quiet)
        for block_slider in block_sliders:
            block_slider.release(on_block_slider, [state, block_shard, *block_sliders], block_lines, **quiet).then(**picture).then(**soup_only, **render_opts)
        uniform.click(on_uniform, [state, *checks], sliders, trigger_mode="always_last", **quiet).then(
            on_mixture, mixture_inputs, [mixture], **quiet
        ).then(**soup_only, **render_opts)

        wiring = dict(
            state=state, job_inputs=job_inputs, controls_from=controls_from, shard_updates=shard_updates, current=current,
            shard_outputs=shard_outputs, preset=preset, checks=checks, sliders=sliders, method=method, params=params, note=note, text_mix=text_mix,
            settings_inputs=settings_inputs, mixture=mixture, on_mixture=on_mixture, full=full, status=status, status_line=status_line,
            history=history, stale=stale, render_opts=render_opts, block_lines=block_lines, picture=picture,
        )
        build_workflow_tabs(host, **wiring)
        build_api(host, state)
    return demo


def build_workflow_tabs(host: StudioHost, *, state, job_inputs, controls_from, shard_updates, current, shard_outputs, preset,
                        checks, sliders, method, params, note, text_mix, settings_inputs, mixture, on_mixture, full, status, status_line,
                        history, stale, render_opts, block_lines, picture) -> None:
    """The paper's workflows: shards in and out, leave-one-out, interpolation and grids, the
    ensemble reference, recipes and export."""
    # Long workflows queue apart from interactive renders and give way to them between images.
    work_opts = dict(api_visibility="private", concurrency_id="workflow", concurrency_limit=2)
    folders = ", ".join(f"`{n}`" for n in host.folder_names()) or "none configured (start the app with --models-dir DIR)"
    with gr.Tabs():
        with gr.Tab("Add / remove shards", elem_id="tab-shards"):
            gr.Markdown(
                "Continual learning and unlearning are re-averages: add a finetune (a diffusers UNet, an A1111 / civitai "
                "single file or a LoRA; validated against the base exactly like the preset's shards) or remove one. "
                "Changes apply to **this page only**. "
                f"Paths are relative to a model folder: {folders}."
            )
            with gr.Row():
                add_name = gr.Textbox(label="New shard name", elem_id="add-name")
                add_path = gr.Textbox(label="Path in a model folder (.safetensors UNet, single file or LoRA; or a unet/ or pipeline folder)", elem_id="add-path")
                add_file = gr.File(label="...or upload a .safetensors checkpoint or LoRA", file_types=[".safetensors"], type="filepath", elem_id="add-file")
                add_button = gr.Button("Add shard", elem_id="add-shard")
            with gr.Row():
                remove_name = gr.Textbox(label="Shard to remove", elem_id="remove-name")
                remove_button = gr.Button("Remove shard", elem_id="remove-shard")
            with gr.Row():
                preset_file = gr.Textbox(label="Save the ticked shards and weights as a preset (file name)", elem_id="save-preset-name")
                preset_overwrite = gr.Checkbox(False, label="overwrite if it exists", elem_id="preset-overwrite")
                preset_button = gr.Button("Save preset", elem_id="save-preset")
            shards_message = gr.Markdown(elem_id="shards-message")
        with gr.Tab("Leave one out", elem_id="tab-loo"):
            gr.Markdown("The full soup and the soup without each shard in turn (the paper's unlearning experiment), each labelled with how far it moved: mean absolute pixel change and RMS weight change.")
            loo_button = gr.Button("Leave one out", elem_id="loo-run")
            loo_message = gr.Markdown(elem_id="loo-message")
            loo_gallery = gr.Gallery(show_label=False, columns=6, height=320, object_fit="contain", format="png", elem_id="loo-gallery", elem_classes=["pixelated"], allow_preview=False, buttons=["download"])
        with gr.Tab("Interpolate / grid", elem_id="tab-interp"):
            with gr.Row():
                interp_from = gr.Textbox(label="From (a shard, a mix a=0.5,b=0.5, or 'soup')", value="soup", elem_id="interp-from")
                interp_to = gr.Textbox(label="To", elem_id="interp-to")
                interp_count = gr.Slider(2, 16, value=5, step=1, label="Images")
                interp_button = gr.Button("Interpolate", elem_id="interp-run")
            interp_message = gr.Markdown(elem_id="interp-message")
            interp_gallery = gr.Gallery(show_label=False, columns=8, height=260, object_fit="contain", format="png", elem_classes=["pixelated"], allow_preview=False, elem_id="interp-gallery", buttons=["download"])
            with gr.Row():
                grid_x = gr.Textbox(label="X axis", value="seed=0,1,2", info="weight:SHARD=0,0.5,1 | block:SHARD:BLOCK=0,0.5,1 (BLOCK: IN04, OUT, ...) | seed=0,1 | prompt=a|b | guidance=1,4 | steps=5,20",
                                    elem_id="grid-x")
                grid_y = gr.Textbox(label="Y axis", value="guidance=2,5", elem_id="grid-y")
                grid_button = gr.Button("Grid", elem_id="grid-run")
            grid_message = gr.Markdown(elem_id="grid-message")
            with gr.Row():
                sweep_a = gr.Textbox(label="Block sweep: most blocks from shard A", elem_id="sweep-a")
                sweep_b = gr.Textbox(label="each group of blocks in turn from shard B", elem_id="sweep-b")
                sweep_button = gr.Button("Block sweep", elem_id="sweep-run")
            sweep_message = gr.Markdown(elem_id="sweep-message")
            sweep_gallery = gr.Gallery(show_label=False, columns=10, height=260, object_fit="contain", format="png", elem_classes=["pixelated"],
                                       allow_preview=False, elem_id="sweep-gallery", buttons=["download"])
            grid_image = gr.Image(show_label=False, type="filepath", format="png", elem_classes=["pixelated"], elem_id="grid-image", buttons=["download", "fullscreen"], interactive=False)
        with gr.Tab("Ensemble reference", elem_id="tab-ensemble"):
            gr.Markdown(
                "The paper's Proposition: the soup approximately samples from the geometric mean of the shards' "
                "distributions, whose score is the weighted sum of their scores. The ensemble render uses that sum at "
                "every step: **one UNet call per component per step**, so it costs N times a soup render."
            )
            ens_button = gr.Button("Render ensemble and soup")
            ens_message = gr.Markdown(elem_id="ens-message")
            ens_gallery = gr.Gallery(show_label=False, columns=2, height=300, object_fit="contain", format="png", elem_classes=["pixelated"], allow_preview=False, buttons=["download"], elem_id="ens-gallery")
        with gr.Tab("A/B compare", elem_id="tab-ab"):
            gr.Markdown("The soup against one of its components, at a viewable size: the component on the left, the soup on the right; drag the divider.")
            with gr.Row():
                ab_shard = gr.Textbox(label="Component (a shard name; empty: the first ticked)", elem_id="ab-shard")
                ab_button = gr.Button("Compare", elem_id="ab-run")
            ab_message = gr.Markdown(elem_id="ab-message")
            ab_view = gr.ImageSlider(show_label=False, type="filepath", format="png", height=512, elem_id="ab-view", elem_classes=["pixelated"],
                                     interactive=False)
        with gr.Tab("Recipe / export", elem_id="tab-export"):
            with gr.Row():
                out_name = gr.Textbox("soup", label="File name", elem_id="out-name")
                out_overwrite = gr.Checkbox(False, label="overwrite if it exists", elem_id="out-overwrite")
            with gr.Row():
                recipe_button = gr.Button("Save recipe (.yaml)", elem_id="save-recipe")
                export_button = gr.Button("Export soup UNet (.safetensors)", elem_id="export-unet")
                single_button = gr.Button("Export single file (A1111, Forge, ComfyUI)", elem_id="export-single")
                pipeline_button = gr.Button("Export pipeline folder", elem_id="export-pipeline")
            recipe_upload = gr.File(label="Load a recipe (.yaml, or a PNG the studio made: it carries its recipe)", file_types=[".yaml", ".yml", ".png"],
                                    type="filepath", elem_id="recipe-upload")
            export_file = gr.File(label="Written file", interactive=False, elem_id="export-file")
            export_message = gr.Markdown(elem_id="export-message")

    def on_add(session, name, path_text, upload, *values):
        try:
            flags, weights, lines = current(handlers.require(session), values)  # before the new row exists
            message = handlers.add_shard(host, session, name, path_text, upload)
        except (ValueError, KeyError) as err:  # the reason goes in the message line; the rows stay as they are
            return [gr.skip()] * (1 + len(shard_outputs)) + [error_line(err), None, gr.skip()]
        return [session, *shard_updates(session, flags, weights, lines), message, None, status_line(session)]

    def on_remove(session, name, *values):
        try:
            flags, weights, lines = current(handlers.require(session), values)
            message = handlers.remove_shard(host, session, name)
        except (ValueError, KeyError) as err:
            return [gr.skip()] * (1 + len(shard_outputs)) + [error_line(err), gr.skip()]
        return [session, *shard_updates(session, flags, weights, lines), message, status_line(session)]

    def on_save_preset(session, file_name, overwrite, *values):
        try:
            key, message = handlers.save_preset(host, session, controls_from(values), file_name, overwrite)
        except (ValueError, KeyError) as err:
            return gr.skip(), error_line(err)
        return gr.Dropdown(choices=list(host.presets)), message

    check_values = [*checks, *sliders, *block_lines]
    message_only = dict(show_progress_on=[shards_message])  # not a spinner over every shard row
    # The shown images follow the shards: a removed shard's component leaves, an added one joins (it
    # stayed on screen, or the new row sat ticked beside images without it).
    again = dict(**full, **render_opts)
    add_button.click(on_add, [state, add_name, add_path, add_file, *check_values], [state, *shard_outputs, shards_message, add_file, status],
                     **work_opts, **message_only).success(**picture).success(**again)
    remove_button.click(on_remove, [state, remove_name, *check_values], [state, *shard_outputs, shards_message, status],
                        **work_opts, **message_only).success(**picture).success(**again)
    preset_button.click(on_save_preset, [state, preset_file, preset_overwrite, *job_inputs[1:]], [preset, shards_message], **work_opts, **message_only)

    # Workflow refusals are said in the tab's message line; the previous result stays on screen.
    @in_place(1)
    def on_loo(session, *values, progress=gr.Progress()):
        results = handlers.leave_one_out(host, session, controls_from(values), with_eta(progress))
        return gr.Gallery(value=results, columns=len(results)), ""

    @in_place(1)
    def on_interpolate(session, start, end, count, *values, progress=gr.Progress()):
        results = handlers.interpolate(host, session, controls_from(values), start, end, count, with_eta(progress))
        return gr.Gallery(value=results, columns=len(results)), ""

    @in_place(1)
    def on_sweep(session, a, b, *values, progress=gr.Progress()):
        results = handlers.block_sweep(host, session, controls_from(values), a, b, with_eta(progress))
        return gr.Gallery(value=results, columns=len(results)), ""

    @in_place(1)
    def on_grid(session, x_text, y_text, *values, progress=gr.Progress()):
        return handlers.grid(host, session, controls_from(values), x_text, y_text, with_eta(progress)), ""

    @in_place(1)
    def on_ensemble(session, *values):
        return handlers.ensemble(host, session, controls_from(values)), ""

    controls = job_inputs[1:]
    ab_button.click(in_place(1)(lambda session, name, *values: (handlers.compare(host, session, controls_from(values), name), "")),
                    [state, ab_shard, *controls], [ab_view, ab_message], **work_opts)
    loo_button.click(on_loo, [state, *controls], [loo_gallery, loo_message], **work_opts)
    interp_button.click(on_interpolate, [state, interp_from, interp_to, interp_count, *controls], [interp_gallery, interp_message], **work_opts)
    grid_button.click(on_grid, [state, grid_x, grid_y, *controls], [grid_image, grid_message], **work_opts)
    sweep_button.click(on_sweep, [state, sweep_a, sweep_b, *controls], [sweep_gallery, sweep_message], **work_opts)
    ens_button.click(on_ensemble, [state, *controls], [ens_gallery, ens_message], **work_opts)

    def in_message_line(fn):
        """File handlers report a refusal in the message line, and the file box then offers nothing
        (it offered the previous file, which a user took for the one refused)."""

        @functools.wraps(fn)
        def wrapper(*args):
            try:
                return fn(*args)
            except (ValueError, KeyError, FileExistsError) as err:
                return None, error_line(err)

        return user_errors(wrapper)

    @in_message_line
    def on_save_recipe(session, file_name, overwrite, *values):
        return handlers.save_recipe(host, session, controls_from(values), file_name, overwrite)

    @in_message_line
    def on_export(session, file_name, overwrite, *values):
        return handlers.export_unet(host, session, controls_from(values), file_name, overwrite)

    @in_message_line
    def on_export_single(session, file_name, overwrite, *values):
        return handlers.export_unet(host, session, controls_from(values), file_name, overwrite, single_file=True)

    @in_message_line
    def on_export_pipeline(session, file_name, overwrite, *values):
        return handlers.export_pipeline(host, session, controls_from(values), file_name, overwrite)

    restore_outputs = [*checks, *sliders, method, *params, note, text_mix, *settings_inputs, *block_lines]
    restore_count = len(restore_outputs)
    loaded = gr.State(False)  # whether the last recipe or history entry was restored (then it is rendered)

    # A refused recipe or history entry is said once, in the message line after the controls, which
    # keep their values (a gr.Error covered every one of them with an "Error" pill) and render nothing.
    def refused(err: Exception) -> list:
        return [gr.skip()] * restore_count + [error_line(err), False]

    @user_errors
    def on_load_recipe(session, path):
        session = handlers.require(session)
        if not path:
            return [gr.skip()] * (restore_count + 1) + [False]
        try:
            mix, recipe = handlers.load_recipe_controls(host, session, path)
        except (ValueError, KeyError) as err:  # named by the file's name, not the server's upload path
            return refused(ValueError(str(err.args[0] if isinstance(err, KeyError) and err.args else err).replace(str(path), Path(path).name)))
        return [*restored(session.names, mix, recipe, f"loaded recipe `{html.escape(Path(path).name)}`"), True]

    @user_errors
    def on_history(session, evt: gr.SelectData):
        try:
            mix, recipe = handlers.history_recipe(session, evt.index)
            return [*restored(handlers.require(session).names, mix, recipe, ""), True]
        except (ValueError, KeyError) as err:
            return refused(err)

    def render_loaded(flag, session, *values, progress=gr.Progress()):
        return full["fn"](session, *values, progress=progress) if flag else [gr.skip()] * len(full["outputs"])

    file_outputs = [export_file, export_message]
    recipe_button.click(on_save_recipe, [state, out_name, out_overwrite, *controls], file_outputs, **work_opts)
    export_button.click(on_export, [state, out_name, out_overwrite, *controls], file_outputs, **work_opts)
    pipeline_button.click(on_export_pipeline, [state, out_name, out_overwrite, *controls], file_outputs, **work_opts)
    single_button.click(on_export_single, [state, out_name, out_overwrite, *controls], file_outputs, **work_opts)
    render_restored = dict(fn=render_loaded, inputs=[loaded, *full["inputs"]], outputs=full["outputs"], **render_opts)
    recipe_upload.upload(
        on_load_recipe, [state, recipe_upload], [*restore_outputs, export_message, loaded], api_visibility="private",
    ).success(on_mixture, [state, *check_values], [mixture], api_visibility="private").success(**picture).success(**render_restored)
    history.select(on_history, [state], [*restore_outputs, stale, loaded], api_visibility="private").success(
        on_mixture, [state, *check_values], [mixture], api_visibility="private"
    ).success(**picture).success(**render_restored)


def build_api(host: StudioHost, state) -> None:
    """Named endpoints for gradio_client: `/mix`, `/render` and `/soup` (the preset's shards, mix
    given as "a=0.5,b=0.5"), and per-client sessions: `/add_shard`, `/remove_shard`,
    `/session_render`, `/grid`. A client's session is its own, like a page's."""
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
        api_name = gr.Textbox(label="name")
        api_path = gr.Textbox(label="path")
        api_axis_x = gr.Textbox(label="x")
        api_axis_y = gr.Textbox(label="y")
        api_gallery = gr.Gallery(label="images", format="png")
        api_image = gr.Image(label="image", type="filepath", format="png")
        api_info = gr.JSON(label="info")
        api_method = gr.Textbox("average", label="method")  # a registered merge method
        api_params = gr.Textbox("", label="params")  # its parameters: "density=0.3,lambda=1"
        api_blocks = gr.Textbox("", label="blocks")  # block weights: "twemoji=IN:0,OUT:1; noto=1,1,0.5,..." (see docs/block-weights.md)
        buttons = {n: gr.Button(n) for n in ("mix", "render", "soup", "add", "remove", "session_render", "grid")}

    def preset_session(preset_name: str) -> Session:
        return handlers.open_session(host, preset_name or None)

    def api_session(session: Session | None, preset_name: str) -> Session:
        return session if session is not None and session.preset == (preset_name or host.default) else preset_session(preset_name)

    def request_mix(studio, shards, mix_text: str, method_name: str, params_text: str, blocks_text: str = ""):
        """The request's Mix, built once: the mix text, method, parameters and block weights over
        these shards (the preset's choice of mixing text encoders)."""
        weights, params = handlers.parse_mix(mix_text), parse_params(params_text or "")
        try:
            blocks = parse_blocks(blocks_text or "")
        except ValueError as err:
            raise ValueError(f"blocks: {err}") from None
        return studio.make_mix(weights, method_name or "average", params, shards, text_encoders=studio.preset.mix_text_encoders, blocks=blocks)

    @user_errors
    def api_mix_fn(preset_name, mix_text, method_name="average", params_text="", blocks_text=""):
        """Normalize a mix and return its recipe (method, parameters, shard names, content hashes, weights, block weights) and label."""
        studio = host.get(preset_name or None)
        mix = request_mix(studio, None, mix_text, method_name, params_text, blocks_text)
        return {"label": mix.label, "recipe": mix.recipe()}

    def render_with(session: Session, mix_text: str, values) -> tuple:
        *settings_values, method_name, params_text, blocks_text = values
        settings = settings_from(*settings_values)
        studio = host.get(session.preset)
        mix = request_mix(studio, session.shards, mix_text, method_name, params_text, blocks_text)
        results = studio.render(mix, settings)
        files = handlers.image_files(host, results[:-1], settings) + [handlers.soup_file(host, results[-1], mix, settings)]
        return files, {"labels": [r.label for r in results], "recipe": mix.recipe()}

    @user_errors
    def api_render_fn(preset_name, mix_text, *values):
        """Render every component of the mix and the soup (the preset's shards); images are labelled, the soup last."""
        return render_with(preset_session(preset_name), mix_text, values)

    @user_errors
    def api_soup_fn(preset_name, mix_text, *values):
        """The soup alone (what a slider release renders), over the preset's shards."""
        *settings, method_name, params_text, blocks_text = values
        settings_ = settings_from(*settings)
        studio = host.get(preset_name or None)
        mix = request_mix(studio, None, mix_text, method_name, params_text, blocks_text)
        soup = studio.render_soup(mix, settings_)
        return handlers.soup_file(host, soup, mix, settings_)[0], {"label": soup.label, "recipe": mix.recipe()}

    @user_errors
    def api_session_render_fn(session, preset_name, mix_text, *values):
        """Like /render, over this client's own session (with the shards it added)."""
        session = api_session(session, preset_name)
        return (session, *render_with(session, mix_text, values))

    @user_errors
    def api_add_fn(session, preset_name, name, path):
        """Add a shard (a path inside a model folder) to this client's session."""
        session = api_session(session, preset_name)
        message = handlers.add_shard(host, session, name, path)
        return session, {"message": message, "shards": session.names}

    @user_errors
    def api_remove_fn(session, preset_name, name):
        """Remove a shard from this client's session."""
        session = api_session(session, preset_name)
        message = handlers.remove_shard(host, session, name)
        return session, {"message": message, "shards": session.names}

    @user_errors
    def api_grid_fn(session, preset_name, mix_text, x_text, y_text, *values):
        """An X x Y grid of soups as one labelled PNG (background priority: interactive renders go first)."""
        *settings, method_name, params_text, blocks_text = values
        session = api_session(session, preset_name)
        mix = handlers.parse_mix(mix_text)
        unknown = [n for n in mix if n not in session.shards]
        if unknown:
            raise ValueError(f"unknown shard {unknown[0]!r} (this session has: {', '.join(session.shards)})")
        try:
            blocks = parse_blocks(blocks_text or "")
        except ValueError as err:
            raise ValueError(f"blocks: {err}") from None
        if [n for n in blocks if n not in mix]:
            raise ValueError(f"blocks: {next(n for n in blocks if n not in mix)!r} is not in the mix ({', '.join(mix)})")
        controls = Controls(tuple(n in mix for n in session.names), tuple(mix.get(n, 0.0) for n in session.names), method_name or "average",
                            tuple(parse_params(params_text or "").items()), settings_from(*settings),
                            blocks=tuple(blocks.get(n, "") for n in session.names))
        return session, handlers.grid(host, session, controls, x_text, y_text)

    opts = dict(concurrency_id="render", concurrency_limit=host.render_slots)
    method_inputs = [api_method, api_params, api_blocks]
    buttons["mix"].click(api_mix_fn, [api_preset, api_mix, *method_inputs], [api_info], api_name="mix", **opts)
    buttons["render"].click(api_render_fn, [api_preset, api_mix, *api_settings, *method_inputs], [api_gallery, api_info], api_name="render", **opts)
    buttons["soup"].click(api_soup_fn, [api_preset, api_mix, *api_settings, *method_inputs], [api_image, api_info], api_name="soup", **opts)
    buttons["session_render"].click(
        api_session_render_fn, [state, api_preset, api_mix, *api_settings, *method_inputs], [state, api_gallery, api_info], api_name="session_render", **opts
    )
    buttons["add"].click(api_add_fn, [state, api_preset, api_name, api_path], [state, api_info], api_name="add_shard", concurrency_id="workflow", concurrency_limit=2)
    buttons["remove"].click(api_remove_fn, [state, api_preset, api_name], [state, api_info], api_name="remove_shard", concurrency_id="workflow", concurrency_limit=2)
    buttons["grid"].click(
        api_grid_fn, [state, api_preset, api_mix, api_axis_x, api_axis_y, *api_settings, *method_inputs], [state, api_image], api_name="grid",
        concurrency_id="workflow", concurrency_limit=2,
    )


def launch(demo: gr.Blocks, port: int | None = None, share: bool = False, max_file_size: str | int | None = "16gb", **kwargs):
    """Serve on 127.0.0.1 only, with no share link unless asked; uploads above `max_file_size` are refused."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name="127.0.0.1", server_port=port, share=share, css=CSS, js=JS, show_error=True, max_file_size=max_file_size, **kwargs
    )
