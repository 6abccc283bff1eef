"""The page's tabs, the paper's workflows, each declared and wired by a function of its own: shards
in and out (continual learning, unlearning), leave-one-out, interpolation, grids and the block sweep,
the ensemble reference, A/B compare, and recipes and exports (with a recipe or history entry loaded
back onto the controls)."""

from __future__ import annotations

import functools
import html
from pathlib import Path

import gradio as gr

from . import session as handlers
from .find import find_tab
from .panels import QUIET, Page
from .parts import error_line, in_place, restored, user_errors, with_eta

# Long workflows queue apart from interactive renders and give way to them between images.
WORK = dict(api_visibility="private", concurrency_id="workflow", concurrency_limit=2)


def build_tabs(p: Page) -> None:
    p.views = []  # every workflow's result (an image or gallery) and its message line
    with gr.Tabs():
        shards_tab(p)
        leave_one_out_tab(p)
        interpolate_tab(p)
        ensemble_tab(p)
        compare_tab(p)
        export_tab(p)
        find_tab(p)

    def clear_views(session, name):
        """A removed shard leaves every view: workflow results are cleared, saying why (they may show it)."""
        said = f"cleared: shard {html.escape((name or '').strip())} was removed"
        return [v for _ in p.views for v in (None, said)] + [session.history_items()]

    outputs = [v for pair in p.views for v in pair] + [p.history]
    p.removed.success(clear_views, [p.state, p.remove_name], outputs, **QUIET)


def shards_tab(p: Page) -> None:
    host = p.host
    folders = ", ".join(f"`{n}`" for n in host.folder_names()) or "none configured (start the app with --models-dir DIR)"
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

    def on_add(session, name, path_text, upload, *values):
        try:
            flags, weights, lines = p.current(handlers.require(session), values)  # before the new row exists
            message = handlers.add_shard(host, session, name, path_text, upload)
        except (ValueError, KeyError) as err:  # the reason goes in the message line; the rows stay as they are
            return [gr.skip()] * (1 + len(p.shard_outputs)) + [error_line(err), None, gr.skip()]
        return [session, *p.shard_updates(session, flags, weights, lines), message, None, p.status_line(session)]

    def on_remove(session, name, *values):
        try:
            flags, weights, lines = p.current(handlers.require(session), values)
            message = handlers.remove_shard(host, session, name)
        except (ValueError, KeyError) as err:
            return [gr.skip()] * (1 + len(p.shard_outputs)) + [error_line(err), gr.skip()]
        return [session, *p.shard_updates(session, flags, weights, lines), message, p.status_line(session)]

    def on_save_preset(session, file_name, overwrite, *values):
        try:
            key, message = handlers.save_preset(host, session, p.controls_from(values), file_name, overwrite)
        except (ValueError, KeyError) as err:
            return gr.skip(), error_line(err)
        return gr.Dropdown(choices=list(host.presets)), message

    rows = p.row_inputs[1:]
    message_only = dict(show_progress_on=[shards_message])  # not a spinner over every shard row
    # The shown images follow the shards: a removed shard's component leaves, an added one joins (it
    # stayed on screen, or the new row sat ticked beside images without it).
    again = dict(**p.full, **p.render_opts)
    add_button.click(on_add, [p.state, add_name, add_path, add_file, *rows], [p.state, *p.shard_outputs, shards_message, add_file, p.status],
                     **WORK, **message_only).success(**p.picture).success(**again)
    p.remove_name = remove_name
    p.removed = remove_button.click(on_remove, [p.state, remove_name, *rows], [p.state, *p.shard_outputs, shards_message, p.status],
                                    **WORK, **message_only)
    p.removed.success(**p.picture).success(**again)
    preset_button.click(on_save_preset, [p.state, preset_file, preset_overwrite, *p.control_inputs], [p.preset, shards_message], **WORK, **message_only)


def gallery(elem_id: str, columns: int, height: int, **more) -> gr.Gallery:
    """A workflow's result gallery: pixel art drawn as pixels, each image downloadable."""
    return gr.Gallery(show_label=False, columns=columns, height=height, object_fit="contain", format="png", elem_id=elem_id,
                      elem_classes=["pixelated"], allow_preview=False, buttons=["download"], **more)


def as_gallery(results) -> tuple:
    return gr.Gallery(value=results, columns=len(results)), ""


def leave_one_out_tab(p: Page) -> None:
    with gr.Tab("Leave one out", elem_id="tab-loo"):
        gr.Markdown("The full soup and the soup without each shard in turn (the paper's unlearning experiment), each labelled with how far it moved: mean absolute pixel change and RMS weight change.")
        button = gr.Button("Leave one out", elem_id="loo-run")
        message = gr.Markdown(elem_id="loo-message")
        images = gallery("loo-gallery", 6, 320)
    p.views.append((images, message))

    @in_place(1)  # a refusal said in the tab's message line; the previous result stays on screen
    def on_loo(session, *values, progress=gr.Progress()):
        return as_gallery(handlers.leave_one_out(p.host, session, p.controls_from(values), with_eta(progress)))

    button.click(on_loo, p.job_inputs, [images, message], show_progress_on=[images], **WORK)


def interpolate_tab(p: Page) -> None:
    """The hybrid-style strip, the X x Y grid and the block sweep."""
    with gr.Tab("Interpolate / grid", elem_id="tab-interp"):
        with gr.Row():
            start = gr.Textbox(label="From (a shard, a mix a=0.5,b=0.5, or 'soup')", value="soup", elem_id="interp-from")
            end = gr.Textbox(label="To", elem_id="interp-to")
            count = gr.Slider(2, 16, value=5, step=1, label="Images")
            interp_button = gr.Button("Interpolate", elem_id="interp-run")
        interp_message = gr.Markdown(elem_id="interp-message")
        interp_gallery = gallery("interp-gallery", 8, 260)
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
        sweep_gallery = gallery("sweep-gallery", 10, 260)
        grid_image = gr.Image(show_label=False, type="filepath", format="png", elem_classes=["pixelated"], elem_id="grid-image", buttons=["download", "fullscreen"], interactive=False)
    p.views += [(interp_gallery, interp_message), (grid_image, grid_message), (sweep_gallery, sweep_message)]

    host, controls_from = p.host, p.controls_from

    @in_place(1)
    def on_interpolate(session, a, b, n, *values, progress=gr.Progress()):
        return as_gallery(handlers.interpolate(host, session, controls_from(values), a, b, n, with_eta(progress)))

    @in_place(1)
    def on_sweep(session, a, b, *values, progress=gr.Progress()):
        return as_gallery(handlers.block_sweep(host, session, controls_from(values), a, b, with_eta(progress)))

    @in_place(1)
    def on_grid(session, x_text, y_text, *values, progress=gr.Progress()):
        return handlers.grid(host, session, controls_from(values), x_text, y_text, with_eta(progress)), ""

    controls = p.control_inputs
    interp_button.click(on_interpolate, [p.state, start, end, count, *controls], [interp_gallery, interp_message], show_progress_on=[interp_gallery], **WORK)
    grid_button.click(on_grid, [p.state, grid_x, grid_y, *controls], [grid_image, grid_message], show_progress_on=[grid_image], **WORK)
    sweep_button.click(on_sweep, [p.state, sweep_a, sweep_b, *controls], [sweep_gallery, sweep_message], show_progress_on=[sweep_gallery], **WORK)


def ensemble_tab(p: Page) -> None:
    with gr.Tab("Ensemble reference", elem_id="tab-ensemble"):
        gr.Markdown(
            "The paper's Proposition: the soup approximately samples from the geometric mean of the shards' "
            "distributions, whose score is the weighted sum of their scores. The ensemble render uses that sum at "
            "every step: **one UNet call per component per step**, so it costs N times a soup render."
        )
        button = gr.Button("Render ensemble and soup")
        message = gr.Markdown(elem_id="ens-message")
        images = gallery("ens-gallery", 2, 300)
    p.views.append((images, message))

    @in_place(1)
    def on_ensemble(session, *values):
        return handlers.ensemble(p.host, session, p.controls_from(values)), ""

    button.click(on_ensemble, p.job_inputs, [images, message], show_progress_on=[images], **WORK)


def compare_tab(p: Page) -> None:
    with gr.Tab("A/B compare", elem_id="tab-ab"):
        gr.Markdown("The soup against one of its components, at a viewable size: the component on the left, the soup on the right; drag the divider.")
        with gr.Row():
            shard = gr.Textbox(label="Component (a shard name; empty: the first ticked)", elem_id="ab-shard")
            button = gr.Button("Compare", elem_id="ab-run")
        message = gr.Markdown(elem_id="ab-message")
        view = gr.ImageSlider(show_label=False, type="filepath", format="png", height=512, elem_id="ab-view", elem_classes=["pixelated"], interactive=False)
    p.views.append((view, message))

    @in_place(1)
    def on_compare(session, name, *values):
        return handlers.compare(p.host, session, p.controls_from(values), name), ""

    button.click(on_compare, [p.state, shard, *p.control_inputs], [view, message], show_progress_on=[view], **WORK)


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


def export_tab(p: Page) -> None:
    """Save the recipe, export the soup three ways, and load a recipe (YAML or a studio PNG)."""
    with gr.Tab("Recipe / export", elem_id="tab-export"):
        with gr.Row():
            out_name = gr.Textbox("soup", label="File name", elem_id="out-name")
            out_overwrite = gr.Checkbox(False, label="overwrite if it exists", elem_id="out-overwrite")
        with gr.Row():
            buttons = {
                "recipe": gr.Button("Save recipe (.yaml)", elem_id="save-recipe"),
                "unet": gr.Button("Export soup UNet (.safetensors)", elem_id="export-unet"),
                "single-file": gr.Button("Export single file (A1111, Forge, ComfyUI)", elem_id="export-single"),
                "pipeline": gr.Button("Export pipeline folder", elem_id="export-pipeline"),
            }
        upload = gr.File(label="Load a recipe (.yaml, or a PNG the studio made: it carries its recipe)", file_types=[".yaml", ".yml", ".png"],
                         type="filepath", elem_id="recipe-upload")
        export_file = gr.File(label="Written file", interactive=False, elem_id="export-file")
        export_message = gr.Markdown(elem_id="export-message")

    host = p.host
    writers = {
        "recipe": handlers.save_recipe,
        "unet": handlers.export_unet,
        "single-file": functools.partial(handlers.export_unet, single_file=True),
        "pipeline": handlers.export_pipeline,
    }

    def writer(write):
        return in_message_line(lambda session, file_name, overwrite, *values: write(host, session, p.controls_from(values), file_name, overwrite))

    for kind, button in buttons.items():
        button.click(writer(writers[kind]), [p.state, out_name, out_overwrite, *p.control_inputs], [export_file, export_message], **WORK)
    wire_restores(p, upload, export_message)


def wire_restores(p: Page, upload: gr.File, upload_message: gr.Markdown) -> None:
    """A recipe file or a history entry put back on the controls, then rendered. A refused one is
    said once, in the message line after the controls, which keep their values (a gr.Error covered
    every one of them with an "Error" pill) and render nothing."""
    host, count = p.host, len(p.restore_outputs)
    loaded = gr.State(False)  # whether the last recipe or history entry was restored (then it is rendered)

    def refused(err: Exception) -> list:
        return [gr.skip()] * count + [error_line(err), False]

    @user_errors
    def on_load_recipe(session, path):
        session = handlers.require(session)
        if not path:
            return [gr.skip()] * (count + 1) + [False]
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
        return p.on_generate(session, *values, progress=progress) if flag else [gr.skip()] * len(p.render_outputs)

    render_restored = dict(fn=render_loaded, inputs=[loaded, *p.job_inputs], outputs=p.render_outputs, **p.render_opts)
    upload.upload(on_load_recipe, [p.state, upload], [*p.restore_outputs, upload_message, loaded], **QUIET).success(
        p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET).success(**p.picture).success(**render_restored)
    p.history.select(on_history, [p.state], [*p.restore_outputs, p.stale, loaded], **QUIET).success(
        p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET).success(**p.picture).success(**render_restored)
