"""The small pieces every panel of the page shares: its style, refusal wrappers (said in place, never
as a pill over a control), progress with time left, the mixture bar and the method parameter controls."""

from __future__ import annotations

import functools
import html
import logging
import time
import typing

import gradio as gr

from ..maths.methods import METHODS, warm
from ..maths.soup import checked_weight, rounded_shares
from .session import MAX_SHARDS
from .widgets import TypedSlider

logger = logging.getLogger(__name__)

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
#history .thumbnail-item .caption-label { white-space: normal !important; overflow: hidden !important; max-width: 88px !important; font-size: 9px; line-height: 1.15; }
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

    def report(fraction: float, what: str) -> None:  # Gradio draws the share itself ("- 28.6%"): said once
        elapsed = clock() - start
        left = f", about {elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        progress(fraction, desc=f"{what}{left}")

    return report


def error_line(err: Exception) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"<span class='error-line'>❌ {html.escape(str(message))}</span>"


def mixture_html(names: list[str], weights: list[float]) -> str:
    """A bar per shard, as wide as its normalized weight (the shares shown add up to 100%); a weight
    out of range is said instead (the bar drew a typed -1 as 0, "openmoji 100%")."""
    for name, w in zip(names, weights):
        try:
            checked_weight(name, w)
        except ValueError as err:
            return error_line(err)
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
    """The method's formula and reference; while its kernels compile in the background (a server on
    an SD-sized model), that it merges uncompiled, slower, until they are ready."""
    m = METHODS[name]
    note = f"<small>{html.escape(m.summary)}. <i>{html.escape(m.reference)}</i></small>"
    counts = sorted({v[1] for v in warm.compiling(name)})
    if counts:
        shards = " or ".join(str(k) for k in counts)
        note += (f"<br><small class='compiling-note'>⏳ {html.escape(name)}'s kernels for {shards} shards are compiling in the background; "
                 "until they are ready its merges run uncompiled (slower, the same weights).</small>")
    return note


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


