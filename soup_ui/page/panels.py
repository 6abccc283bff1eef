"""The page's main panels: the header, the shard rows, the block editor, the merge method, the render
settings and the images, each declared by a function of its own, and wired by one per concern (the
preset and a reload's restore, the mix, the block weights). `Page` holds the components and the
few helpers the handlers of every panel share."""

from __future__ import annotations

import functools
import html
import random

import gradio as gr

from ..maths.methods import METHODS
from ..modelfiles.presets import SCHEDULERS
from . import session as handlers
from .parts import (FIELDS, MAX_BLOCKS, PALETTE, PARAMS, error_line, in_place, method_note, method_updates, mixture_html, param_control,
                    restored, user_errors, with_eta)
from .session import MAX_SHARDS, Controls, Session, StudioHost, settings_from
from .widgets import TypedSlider

QUIET = dict(api_visibility="private")  # the page's own events: not part of the API
UNSEEN = dict(**QUIET, show_progress="hidden")  # no timer over the rows and images


class Page:
    """One page's components (set by the declaring functions) and what its handlers share: the
    typed controls from the control values, the shard rows' updates, the block picture, the
    preset's header line, and the image outputs of a render."""

    def __init__(self, host: StudioHost):
        self.host = host
        self.render_opts = dict(api_visibility="private", trigger_mode="always_last", concurrency_id="render", concurrency_limit=host.render_slots)

    def collect(self) -> None:
        """The input and output lists the events share (after every panel is declared)."""
        self.settings_inputs = [self.prompt, self.negative, self.seed, self.steps, self.guidance, self.scheduler, self.height, self.width]
        self.control_inputs = [self.method, *self.params, self.text_mix, *self.checks, *self.sliders, *self.settings_inputs, *self.block_lines]
        self.job_inputs = [self.state, *self.control_inputs]
        self.shard_outputs = [*self.rows, *self.checks, *self.sliders, *self.notes, self.mixture, *self.block_lines, *self.block_presets]
        self.render_outputs = [self.components, self.soup_image, self.soup_label, self.history, self.saved, self.stale]
        self.restore_outputs = [*self.checks, *self.sliders, self.method, *self.params, self.note, self.text_mix, *self.settings_inputs, *self.block_lines]
        self.row_inputs = [self.state, *self.checks, *self.sliders, *self.block_lines]  # what `current` reads
        self.mixture_inputs = [self.state, *self.checks, *self.sliders]
        self.preset_outputs = [self.state, *self.shard_outputs, self.status, self.examples, *self.settings_inputs, self.generate, self.preset,
                               self.components, self.soup_image, self.soup_label, self.stale, self.text_mix, self.history,
                               self.block_shard, self.blocks_picture, *self.block_sliders]
        self.full = dict(fn=self.on_generate, inputs=self.job_inputs, outputs=self.render_outputs)  # components and soup
        self.soup_only = dict(fn=self.on_soup, inputs=self.job_inputs, outputs=self.render_outputs)
        self.picture = dict(fn=self.on_picture, inputs=self.row_inputs, outputs=[self.blocks_picture], **UNSEEN)  # the block picture follows

    def controls_from(self, values) -> Controls:
        """Typed controls from the values of `control_inputs`."""
        n = len(PARAMS)
        method_, given, text_ = values[0], dict(zip(PARAMS, values[1 : 1 + n])), values[1 + n]
        rest = values[2 + n :]
        flags = tuple(bool(v) for v in rest[:MAX_SHARDS])
        weights = tuple(float(v or 0.0) for v in rest[MAX_SHARDS : 2 * MAX_SHARDS])
        chosen = tuple((p, given[p]) for p in METHODS[method_].param_names()) if method_ in METHODS else ()
        settings_end = 2 * MAX_SHARDS + len(self.settings_inputs)
        lines = tuple(str(v or "") for v in rest[settings_end : settings_end + MAX_SHARDS])
        return Controls(flags, weights, method_, chosen, settings_from(*rest[2 * MAX_SHARDS : settings_end]), bool(text_), lines)

    def shard_updates(self, session: Session, flags=None, weights=None, lines=None) -> list:
        """Rows for the session's shards, in its order (keeping given ticks, weights and block
        weights by name), with the block presets of the preset's denoiser."""
        shards = list(session.shards.values())
        flags, weights, lines = flags or {}, weights or {}, lines or {}
        blank = MAX_SHARDS - len(shards)
        ticks = [flags.get(s.name, True) for s in shards]
        values = [weights.get(s.name, s.weight) for s in shards]
        blocks = self.host.get(session.preset).blocks
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

    @staticmethod
    def current(session: Session, values) -> tuple[dict, dict, dict]:
        """The ticks, weights and block weights shown, by shard name (values: checks, sliders and
        block lines; without the lines, none)."""
        names = session.names
        lines = {n: values[2 * MAX_SHARDS + i] or "" for i, n in enumerate(names)} if len(values) >= 3 * MAX_SHARDS else {}
        return ({n: bool(values[i]) for i, n in enumerate(names)}, {n: float(values[MAX_SHARDS + i] or 0) for i, n in enumerate(names)}, lines)

    def picture_of(self, session: Session, flags: dict, lines: dict, weights: dict | None = None) -> str:
        ticked = [n for n in session.names if flags.get(n)]
        colours = [PALETTE[session.names.index(n) % len(PALETTE)] for n in ticked]  # each row's colour in the mixture bar
        return handlers.blocks_picture(self.host.get(session.preset).blocks, ticked, lines, colours, weights)

    def on_picture(self, session, *values):
        """The block picture of the ticked rows (values: checks, sliders, block lines)."""
        if session is None:
            return gr.skip()
        flags, weights, lines = self.current(session, values)
        return self.picture_of(session, flags, lines, weights)

    def on_mixture(self, session, *values):
        if session is None:
            return gr.skip()
        flags, weights, _ = self.current(session, values)
        return mixture_html(list(flags), [weights[n] if flags[n] else 0 for n in flags])

    def panel_updates(self, session: Session, name: str | None, lines: dict) -> list:
        """The block editor for one shard (default: the first): a slider per block of this
        denoiser at its current values, labelled with the block IDs."""
        blocks = self.host.get(session.preset).blocks
        ids = blocks.ids if blocks is not None else ()
        name = name if name in session.shards else (session.names[0] if session.names else None)
        vector = (1.0,) * len(ids)
        if blocks is not None and name and (lines.get(name) or "").strip():
            vector, _ = handlers.block_vectors(blocks, {name: lines[name]})
            vector = vector.get(name, (1.0,) * len(ids))
        return [gr.Dropdown(choices=session.names, value=name),
                *[gr.Slider(label=b, value=min(1.0, v), visible=True) for b, v in zip(ids, vector)],
                *[gr.Slider(visible=False)] * (MAX_BLOCKS - len(ids))]

    def status_line(self, session) -> str:
        """The preset line: name, description, this page's shard count (kept current as shards
        are added and removed), family, device and memory plan, and shards left out."""
        studio = self.host.get(session.preset)
        failed = "".join(f"\n\n⚠️ shard **{n}** left out: {html.escape(why)}" for n, why in studio.failed.items())
        lean = ", lean mode (shards streamed from disk)" if studio.lean else ""
        lean += f"<br><small>memory: {html.escape(studio.memory_plan)}</small>"
        return (f"**{studio.preset.name or session.preset}**: {html.escape(studio.preset.description)}"
                f" ({len(session.shards)} shards; {studio.renderer.family_name}: {type(studio.pipe).__name__}, soups its {studio.kind.denoiser};"
                f" {studio.runs_on}{lean}){failed}")

    @staticmethod
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

    @staticmethod
    def show(images: handlers.Images, session: Session) -> list:
        """The render outputs for `images`: components, soup, its caption, history, saved state, note."""
        if images.superseded:  # a newer click of this page is on its way: keep what is shown
            return [gr.skip()] * 6
        if images.empty:  # the last images stay, marked as such
            return [gr.skip(), gr.skip(), "**Soup**: nothing to mix", gr.skip(), gr.skip(), images.note]
        gallery = gr.skip() if images.components is None else gr.Gallery(value=images.components, columns=max(1, len(images.components)))
        path, caption = images.soup
        return [gallery, gr.Image(value=path), caption, session.history_items(), handlers.saved_state(session), images.note]

    @in_place(5)  # a refused setting or mix: said under the images, which stay
    def on_generate(self, session, *values, progress=gr.Progress()):
        return self.show(handlers.generate(self.host, session, self.controls_from(values), with_eta(progress)), session)

    @in_place(5)
    def on_soup(self, session, *values):
        return self.show(handlers.render_soup(self.host, session, self.controls_from(values)), session)

    def on_param_soup(self, session, *values):
        """A method parameter set: the soup; a value out of range is refused in place and its control
        goes back to the soup's value (a typed TIES density of 1.5 left 1 in the box, 0.2 in the label
        and 1.5 in the message)."""
        controls = self.controls_from(values)
        try:
            METHODS[controls.method].parse(dict(controls.params))
        except ValueError as err:
            good = handlers.shown_params(session, controls.method)
            return [gr.skip()] * 5 + [error_line(err)] + [gr.update(value=good[n]) if n in good else gr.skip() for n in PARAMS]
        return [*self.on_soup(session, *values), *[gr.skip()] * len(PARAMS)]

    def on_weight_soup(self, session, *values):
        """A weight set: the soup. Weights are ratios: a typed weight above the slider's end (5) sets
        every row to its share of the largest (5 : 1 : 1 as 1 : 0.2 : 0.2), so the boxes show what the
        soup uses (the box drew 1 while the soup used 5). In the render's own event: a later event of
        the chain would read a typed -1 as the slider's 0."""
        rendered = self.on_soup(session, *values)
        weights = [float(w or 0.0) for w in self.controls_from(values).weights]
        top = max(weights, default=0.0)
        if top <= 1.0 or any(w < 0 for w in weights) or "error-line" in str(rendered[-1]):  # refused: said, nothing moves
            return [*rendered, *[gr.skip()] * len(weights)]
        return [*rendered, *[gr.Slider(value=w / top) for w in weights]]


def declare_header(p: Page) -> None:
    p.state = gr.State(None, delete_callback=lambda s: handlers.close_session(p.host, s))
    gr.Markdown(
        "# Diffusion Soup Studio\nMix finetuned denoisers (UNets, transformers) by averaging their weights "
        "([Diffusion Soup](https://arxiv.org/abs/2406.08431)): pick shards and weights, and compare each "
        "component with the hybrid, all rendered from the same noise."
    )
    with gr.Row():
        p.preset = gr.Dropdown(list(p.host.presets), value=p.host.default, label="Preset", scale=1, interactive=False, elem_id="preset")
        p.status = gr.Markdown("Loading the preset...", elem_id="status")


def declare_shards(p: Page) -> None:
    """A row per shard (hidden until a preset fills it): tick, weight, description, block weights."""
    gr.Markdown("### Shards")
    p.rows, p.checks, p.sliders, p.notes, p.block_lines, p.block_presets = [], [], [], [], [], []
    for i in range(MAX_SHARDS):
        with gr.Group(visible=False) as row:
            p.rows.append(row)
            p.checks.append(gr.Checkbox(value=True, label=f"shard {i}", elem_id=f"shard-check-{i}"))
            p.sliders.append(TypedSlider(0.0, 1.0, value=1.0, step=0.05, label="weight", elem_id=f"shard-weight-{i}"))
            p.notes.append(gr.Markdown())
            with gr.Accordion("blocks", open=False, elem_id=f"shard-blocks-box-{i}"):
                with gr.Row():
                    p.block_lines.append(gr.Textbox(
                        label="block weights (Enter applies; empty: all 1)", scale=3, elem_id=f"shard-blocks-{i}",
                        info="one value per block in order (SuperMerger's list), or NAME:VALUE pairs, e.g. IN:0,OUT:1"))
                    p.block_presets.append(gr.Dropdown([], value=None, label="preset", scale=1, elem_id=f"shard-blocks-preset-{i}"))
    p.mixture = gr.HTML(elem_id="mixture")
    p.uniform = gr.Button("Uniform (the paper's uniform soup)", elem_id="uniform")


def declare_blocks(p: Page) -> None:
    with gr.Accordion("Block weights: where in the denoiser each shard acts", open=False, elem_id="blocks-panel"):
        p.blocks_picture = gr.HTML(elem_id="blocks-picture")
        p.block_shard = gr.Dropdown([], value=None, label="Edit the blocks of (a slider per block; release applies)", elem_id="blocks-shard")
        with gr.Row():
            p.alpha_line = gr.Textbox(label="SuperMerger alpha list (Enter applies)", scale=3, elem_id="supermerger-alpha",
                                      info="SuperMerger's weight sum of the first two ticked shards A and B, in its meaning: one alpha per block, "
                                           "block = (1 - alpha) A + alpha B; sets both weights to 1 and their block lines")
            p.alpha_message = gr.Markdown(elem_id="supermerger-alpha-message")
        with gr.Row(elem_id="block-sliders"):
            p.block_sliders = [gr.Slider(0.0, 1.0, value=1.0, step=0.05, label=f"block {j}", visible=False, min_width=90, elem_id=f"block-slider-{j}")
                               for j in range(MAX_BLOCKS)]


def declare_methods(p: Page) -> None:
    p.method = gr.Dropdown(list(METHODS), value="average", label="Merge method", elem_id="method")
    p.note = gr.HTML(method_note("average"), elem_id="method-note")
    p.params = [param_control(name, FIELDS[name]) for name in PARAMS]
    p.text_mix = gr.Checkbox(
        False, label="Mix text encoders too", elem_id="mix-text-encoders",
        info="the shards' own text encoders (full checkpoints, pipeline folders) with the same weights; a shard without one counts as the base's",
    )


def declare_settings(p: Page) -> None:
    p.examples = gr.Dropdown([], label="Example prompts", interactive=True, elem_id="examples")
    p.prompt = gr.Textbox(label="Prompt (Enter renders)", elem_id="prompt")
    p.negative = gr.Textbox(label="Negative prompt", elem_id="negative")
    with gr.Row():
        p.seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
        p.randomize = gr.Button("Randomize seed", size="sm", elem_id="randomize")
    with gr.Row():
        p.steps = gr.Number(20, label="Steps (1-150)", precision=0, elem_id="steps")
        p.guidance = gr.Number(5.0, label="Guidance scale (0-30)", elem_id="guidance")
    p.scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="Scheduler")
    with gr.Row():
        p.height = gr.Number(64, label="Height", precision=0, elem_id="height")
        p.width = gr.Number(64, label="Width", precision=0, elem_id="width")
    p.generate = gr.Button("Generate", variant="primary", elem_id="generate", interactive=False)


def declare_images(p: Page) -> None:
    with gr.Row(equal_height=True):
        with gr.Column(scale=3):
            gr.Markdown("**Components**")
            p.components = gr.Gallery(
                show_label=False, columns=4, height=300, object_fit="contain", elem_id="components",
                elem_classes=["pixelated"], allow_preview=False, format="png", buttons=["download"],
            )
            p.stale = gr.Markdown(elem_id="stale-note")
        with gr.Column(scale=0, min_width=260):
            p.soup_label = gr.Markdown("**Soup**", elem_id="soup-label")
            p.soup_image = gr.Image(
                show_label=False, type="filepath", format="png", height=256, elem_id="soup-image",
                elem_classes=["pixelated"], buttons=["download", "fullscreen"], interactive=False,
            )
            p.download_all = gr.Button("Download all (zip: components, soup, recipe)", size="sm", elem_id="download-all")
            p.download_file = gr.File(show_label=False, interactive=False, elem_id="download-all-file", height=60, visible=False)
    p.saved = gr.BrowserState(None, storage_key="diffusion-soup-studio")  # what survives a reload: preset, last mix, added shards
    p.find_saved = gr.BrowserState(None, storage_key="diffusion-soup-studio-search")  # the visitor's "Find the soup" search, across reloads
    p.restoring = gr.State(False)
    p.history = gr.Gallery(label="History of this page's soups (click one to go back to its mix and settings)", columns=12, height=130,
                           object_fit="contain", allow_preview=False, format="png", elem_id="history", elem_classes=["pixelated"])


def wire_preset(p: Page) -> None:
    """A preset chosen (or the page opened): its rows, settings and header. A reload comes back as it
    was: the browser's saved preset, then its added shards, then its mix and settings, rendered
    (nothing happens when nothing was saved)."""
    host = p.host

    @user_errors
    def on_preset(name, old, progress=gr.Progress()):
        try:
            session = handlers.open_session(host, name, old, lambda f, d: progress(f, desc=d))
        except (ValueError, KeyError, OSError) as err:
            if old is None:  # nothing to go back to
                raise
            # The page stays on the preset it had (rows, images, the dropdown itself), the reason in place.
            kept = [gr.skip()] * len(p.preset_outputs)
            kept[p.preset_outputs.index(p.preset)] = gr.Dropdown(value=old.preset)
            kept[p.preset_outputs.index(p.status)] = p.status_line(old) + "\n\n" + error_line(ValueError(f"preset {name!r} not loaded: {err}"))
            return kept
        studio = host.get(session.preset)
        r = studio.preset.render
        first = r.prompt or (r.prompts[0] if r.prompts else "")
        panel = p.panel_updates(session, None, {})
        return [
            session,
            *p.shard_updates(session),
            p.status_line(session),
            gr.Dropdown(choices=r.prompts, value=first if first in r.prompts else None),
            first, *p.family_controls(studio, r), r.height, r.width,
            gr.Button(interactive=True), gr.Dropdown(choices=list(host.presets), interactive=True),  # with presets saved since the page was built
            None, None, "**Soup**", "", studio.preset.mix_text_encoders, [],  # a new session: a new history
            panel[0], p.picture_of(session, {n: True for n in session.names}, {}), *panel[1:],  # the block editor, the picture
        ]

    def on_pick(saved_value):
        name = (saved_value or {}).get("preset")
        return gr.Dropdown(value=name) if name in host.presets else gr.skip()

    def on_restore_shards(session, saved_value, *values):
        if not saved_value or session is None:
            return [gr.skip()] * (1 + len(p.shard_outputs) + 1)
        flags, weights, lines = p.current(session, values)
        lost = handlers.restore_shards(host, session, saved_value)
        handlers.restore_history(host, session, saved_value)  # shown with the restored render
        note = "".join(error_line(ValueError(f"not restored: {line}")) for line in lost)
        return [session, *p.shard_updates(session, flags, weights, lines), note or gr.skip()]

    def on_restore_controls(session, saved_value):
        found = handlers.saved_recipe(session, saved_value) if session is not None else None
        if found is None:
            return [gr.skip()] * len(p.restore_outputs) + [False]
        return [*restored(session.names, *found, "")[:-1], True]

    def on_restored_render(flag, session, *values, progress=gr.Progress()):
        return p.on_generate(session, *values, progress=progress) if flag else [gr.skip()] * len(p.render_outputs)

    p.loaded = p.demo.load(on_pick, [p.saved], [p.preset], **UNSEEN).then(on_preset, [p.preset, p.state], p.preset_outputs, show_progress_on=[p.status], **QUIET).then(
        on_restore_shards, [p.state, p.saved, *p.checks, *p.sliders, *p.block_lines], [p.state, *p.shard_outputs, p.stale], **UNSEEN
    ).then(on_restore_controls, [p.state, p.saved], [*p.restore_outputs, p.restoring], **UNSEEN).then(
        p.on_mixture, p.mixture_inputs, [p.mixture], **UNSEEN
    ).then(**p.picture).then(on_restored_render, [p.restoring, *p.job_inputs], p.render_outputs, **UNSEEN)
    # Menus act when a value is chosen (select), never on a click-away (a dropdown's input event fires on blur).
    p.preset.select(on_preset, [p.preset, p.state], p.preset_outputs, show_progress_on=[p.status], **QUIET)


def wire_mix(p: Page) -> None:
    """Generate renders everything (components come from the cache when unchanged); releasing a
    slider or changing the method re-renders the soup (and the components, when the settings changed
    since they were rendered), once, for the last value only."""
    full, soup_only, render_opts = p.full, p.soup_only, p.render_opts

    def on_uniform(session, *flags):
        # Every row gets the same weight, ticked or not, so a row ticked later joins the soup equally.
        return [gr.Slider(value=1.0) for _ in flags]

    def on_tick(session, *values):
        """Ticking a row whose weight is 0 gives it weight 1, so that it is in the soup it is shown beside."""
        flags, weights = values[:MAX_SHARDS], values[MAX_SHARDS:]
        return [gr.Slider(value=1.0) if f and not w else gr.skip() for f, w in zip(flags, weights)]

    def on_download(session, *values):
        return gr.File(value=handlers.download_all(p.host, session, p.controls_from(values)), visible=True), ""

    p.examples.select(lambda x: x, [p.examples], [p.prompt], **QUIET).then(**full, **render_opts)  # renders, as a slider does
    p.randomize.click(lambda: random.randint(0, 2**31 - 1), None, [p.seed], **QUIET).then(**full, **render_opts)
    p.generate.click(**full, **render_opts)
    p.download_all.click(in_place(1)(on_download), p.job_inputs, [p.download_file, p.stale], **render_opts)
    p.prompt.submit(**full, **render_opts)
    for check in p.checks:
        # always_last: a second click while the first one's render runs is queued, never dropped.
        check.input(on_tick, p.mixture_inputs, p.sliders, trigger_mode="always_last", **QUIET).then(
            p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET
        ).then(**p.picture).then(**full, **render_opts)
    for slider in p.sliders:
        # .input, not .change: programmatic updates (preset, uniform, recipe, shards) redraw the bar themselves.
        slider.input(p.on_mixture, p.mixture_inputs, [p.mixture], show_progress="hidden", trigger_mode="always_last", **QUIET).then(**p.picture)
        slider.release(p.on_weight_soup, p.job_inputs, [*p.render_outputs, *p.sliders], **render_opts)
    # A method brings its own parameters (at their defaults), then the soup is rendered with it.
    p.method.select(method_updates, [p.method], [*p.params, p.note], **QUIET).then(**soup_only, **render_opts)
    param_soup = dict(fn=p.on_param_soup, inputs=p.job_inputs, outputs=[*p.render_outputs, *p.params])
    for control in p.params:
        if isinstance(control, gr.Slider):
            control.release(**param_soup, **render_opts)
        elif isinstance(control, gr.Dropdown):
            control.select(**param_soup, **render_opts)
        else:
            control.submit(**param_soup, **render_opts)
    p.text_mix.input(**full, **render_opts)  # components change too (those with their own text encoder)
    p.uniform.click(on_uniform, [p.state, *p.checks], p.sliders, trigger_mode="always_last", **QUIET).then(
        p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET
    ).then(**soup_only, **render_opts)


def wire_blocks(p: Page) -> None:
    """Block weights: a row's line (Enter), its preset, or the block editor's sliders; the picture
    follows, then the soup is rendered (a refused line: said under the images, which stay)."""
    host = p.host

    def on_block_shard(name, session, *values):
        if session is None:
            return [gr.skip()] * MAX_BLOCKS
        _, _, lines = p.current(session, values)
        return p.panel_updates(session, name, lines)[1:]

    def on_follow(index, session, *values):
        """The block editor turns to the row whose line just changed, its sliders at that line's values."""
        if session is None or index >= len(session.names):
            return [gr.skip()] * (1 + MAX_BLOCKS)
        _, _, lines = p.current(session, values)
        return p.panel_updates(session, session.names[index], lines)

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

    def on_alpha(session, text, *values):
        """SuperMerger's alpha list on the first two ticked rows: weights 1, lines 1 - alpha and alpha."""
        flags, _, _ = p.current(handlers.require(session), values)
        ticked = [n for n in session.names if flags[n]]
        blocks = host.get(session.preset).blocks
        if len(ticked) < 2 or blocks is None:
            raise ValueError("SuperMerger alpha: tick two shards (A, then B)" if blocks is not None else "this denoiser has no block map")
        a, b = (session.names.index(n) for n in ticked[:2])
        vectors = dict(zip((a, b), blocks.from_alpha(text)))
        sliders = [gr.Slider(value=1.0) if i in vectors else gr.skip() for i in range(MAX_SHARDS)]
        return [*sliders, *[blocks.format(vectors[i]) if i in vectors else gr.skip() for i in range(MAX_SHARDS)], ""]

    p.alpha_line.submit(in_place(2 * MAX_SHARDS)(on_alpha), [p.state, p.alpha_line, *p.checks, *p.sliders],
                        [*p.sliders, *p.block_lines, p.alpha_message], **QUIET).success(
        p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET).success(**p.picture).success(**p.soup_only, **p.render_opts)
    soup_only, render_opts = p.soup_only, p.render_opts
    for i, (line, pick) in enumerate(zip(p.block_lines, p.block_presets)):
        follow = dict(fn=functools.partial(on_follow, i), inputs=p.row_inputs, outputs=[p.block_shard, *p.block_sliders], **UNSEEN)
        line.submit(**p.picture).then(**follow).then(**soup_only, **render_opts)
        pick.select(on_block_preset, [p.state, pick], [line], **QUIET).then(**p.picture).then(**follow).then(**soup_only, **render_opts)
    p.block_shard.select(on_block_shard, [p.block_shard, *p.row_inputs], p.block_sliders, **QUIET)
    for block_slider in p.block_sliders:
        block_slider.release(on_block_slider, [p.state, p.block_shard, *p.block_sliders], p.block_lines, **QUIET).then(**p.picture).then(
            **soup_only, **render_opts)
