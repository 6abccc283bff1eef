"""The page's HTTP API for gradio_client: named endpoints over hidden components, each handler as the
page's (same checks, same messages, a client's session its own)."""

from __future__ import annotations

import gradio as gr

from ..modelfiles.presets import parse_blocks, parse_params
from ..search.run import best_recipe, search, setup, with_groups
from . import session as handlers
from .parts import user_errors
from .session import Controls, Session, StudioHost, settings_from


def request_blocks(blocks_text: str) -> dict:
    try:
        return parse_blocks(blocks_text or "")
    except ValueError as err:
        raise ValueError(f"blocks: {err}") from None


def request_mix(studio, shards, mix_text: str, method_name: str, params_text: str, blocks_text: str = ""):
    """The request's Mix, built once: the mix text, method, parameters and block weights over
    these shards (the preset's choice of mixing text encoders)."""
    weights, params = handlers.parse_mix(mix_text), parse_params(params_text or "")
    return studio.make_mix(weights, method_name or "average", params, shards, text_encoders=studio.preset.mix_text_encoders, blocks=request_blocks(blocks_text))


def grid_controls(session: Session, mix_text: str, settings, method_name: str, params_text: str, blocks_text: str) -> Controls:
    """The page's controls for an API grid request over this session's shards."""
    mix = handlers.parse_mix(mix_text)
    unknown = [n for n in mix if n not in session.shards]
    if unknown:
        raise ValueError(f"unknown shard {unknown[0]!r} (this session has: {', '.join(session.shards)})")
    blocks = request_blocks(blocks_text)
    if [n for n in blocks if n not in mix]:
        raise ValueError(f"blocks: {next(n for n in blocks if n not in mix)!r} is not in the mix ({', '.join(mix)})")
    return Controls(tuple(n in mix for n in session.names), tuple(mix.get(n, 0.0) for n in session.names), method_name or "average",
                    tuple(parse_params(params_text or "").items()), settings_from(*settings), blocks=tuple(blocks.get(n, "") for n in session.names))


def find_soup(studio, shards_text: str, scorer_spec: str, target: str, references: list, budget: int, strategy: str, block_groups: bool,
              method: str, params: dict, settings):
    """A scorer search as the CLI runs it (search.run.setup: its checks before any render). A python
    scorer is the command line's only: from the web it would import and call server code."""
    if (scorer_spec or "").startswith("python"):
        raise ValueError("python scorers run only from the command line (they import code on the server); use style or reference")
    names = [n.strip() for n in (shards_text or "").split(",") if n.strip()] or list(studio.shards)
    unknown = [n for n in names if n not in studio.shards]
    if unknown:
        raise ValueError(f"shards: unknown shard {unknown[0]!r} (loaded: {', '.join(studio.shards)})")
    scorer, space, batch = setup(scorer_spec or "style", names, settings, target=target, references=references, method=method)
    return search(studio, with_groups(space, studio) if block_groups else space, scorer, batch, budget=budget, seed=settings.seed,
                  strategy=strategy, params=params)


def build_api(host: StudioHost, state) -> None:
    """Named endpoints for gradio_client: `/mix`, `/render` and `/soup` (the preset's shards, mix
    given as "a=0.5,b=0.5"), and per-client sessions: `/add_shard`, `/remove_shard`,
    `/session_render`, `/grid`. A client's session is its own, like a page's."""
    with gr.Group(visible=False):
        preset, mix_box = gr.Textbox(label="preset"), gr.Textbox(label="mix")
        settings = [
            gr.Textbox(label="prompt"), gr.Textbox(label="negative_prompt"), gr.Number(0, label="seed", precision=0), gr.Number(20, label="steps", precision=0),
            gr.Number(5.0, label="guidance_scale"), gr.Textbox("dpm++", label="scheduler"), gr.Number(64, label="height", precision=0),
            gr.Number(64, label="width", precision=0),
        ]
        name, path = gr.Textbox(label="name"), gr.Textbox(label="path")
        axis_x, axis_y = gr.Textbox(label="x"), gr.Textbox(label="y")
        gallery, image, info = gr.Gallery(label="images", format="png"), gr.Image(label="image", type="filepath", format="png"), gr.JSON(label="info")
        method_inputs = [
            gr.Textbox("average", label="method"),  # a registered merge method
            gr.Textbox("", label="params"),  # its parameters: "density=0.3,lambda=1"
            gr.Textbox("", label="blocks"),  # block weights: "twemoji=IN:0,OUT:1; noto=1,1,0.5,..." (see docs/block-weights.md)
        ]
        search_inputs = [gr.Textbox(label="shards"), gr.Textbox("style", label="scorer"), gr.Textbox(label="target"),
                         gr.File(label="references", file_count="multiple", type="filepath"), gr.Number(16, label="budget", precision=0),
                         gr.Textbox("cmaes", label="strategy"), gr.Checkbox(False, label="block_groups")]
        buttons = {n: gr.Button(n) for n in ("mix", "render", "soup", "add", "remove", "session_render", "grid", "search")}

    def preset_session(preset_name: str) -> Session:
        return handlers.open_session(host, preset_name or None)

    def api_session(session: Session | None, preset_name: str) -> Session:
        return session if session is not None and session.preset == (preset_name or host.default) else preset_session(preset_name)

    @user_errors
    def api_mix_fn(preset_name, mix_text, method_name="average", params_text="", blocks_text=""):
        """Normalize a mix and return its recipe (method, parameters, shard names, content hashes, weights, block weights) and label."""
        mix = request_mix(host.get(preset_name or None), None, mix_text, method_name, params_text, blocks_text)
        return {"label": mix.label, "recipe": mix.recipe()}

    def render_with(session: Session, mix_text: str, values) -> tuple:
        *settings_values, method_name, params_text, blocks_text = values
        settings_ = settings_from(*settings_values)
        studio = host.get(session.preset)
        mix = request_mix(studio, session.shards, mix_text, method_name, params_text, blocks_text)
        results = studio.render(mix, settings_)
        files = handlers.image_files(host, results[:-1], settings_) + [handlers.soup_file(host, results[-1], mix, settings_)]
        return files, {"labels": [r.label for r in results], "recipe": mix.recipe()}

    @user_errors
    def api_render_fn(preset_name, mix_text, *values):
        """Render every component of the mix and the soup (the preset's shards); images are labelled, the soup last."""
        return render_with(preset_session(preset_name), mix_text, values)

    @user_errors
    def api_soup_fn(preset_name, mix_text, *values):
        """The soup alone (what a slider release renders), over the preset's shards."""
        *settings_values, method_name, params_text, blocks_text = values
        settings_ = settings_from(*settings_values)
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
    def api_add_fn(session, preset_name, shard_name, shard_path):
        """Add a shard (a path inside a model folder) to this client's session."""
        session = api_session(session, preset_name)
        message = handlers.add_shard(host, session, shard_name, shard_path)
        return session, {"message": message, "shards": session.names}

    @user_errors
    def api_remove_fn(session, preset_name, shard_name):
        """Remove a shard from this client's session."""
        session = api_session(session, preset_name)
        message = handlers.remove_shard(host, session, shard_name)
        return session, {"message": message, "shards": session.names}

    @user_errors
    def api_grid_fn(session, preset_name, mix_text, x_text, y_text, *values):
        """An X x Y grid of soups as one labelled PNG (background priority: interactive renders go first)."""
        *settings_values, method_name, params_text, blocks_text = values
        session = api_session(session, preset_name)
        return session, handlers.grid(host, session, grid_controls(session, mix_text, settings_values, method_name, params_text, blocks_text), x_text, y_text)

    @user_errors
    def api_search_fn(preset_name, shards_text, scorer_spec, target, references, budget, strategy, block_groups, *values):
        """Search the mix of the shards (comma-separated; default: all) for what the scorer likes best: the
        best recipe, its image and every candidate (mix, score)."""
        *settings_values, method_name, params_text, _ = values
        studio = host.get(preset_name or None)
        settings_ = settings_from(*settings_values)
        found = find_soup(studio, shards_text, scorer_spec, target, references or [], int(budget or 0), strategy or "cmaes", bool(block_groups),
                          method_name or "average", parse_params(params_text or ""), settings_)
        best = found.best
        recipe = best_recipe(studio, found, settings_)
        path = handlers.soup_file_of(host, best.image, best.label)
        return path, {"best": best.row(), "recipe": recipe.model_dump(mode="json"), "searched": found.space.describe(), "stopped": found.stopped,
                      "candidates": [t.row() for t in found.tried]}

    opts = dict(concurrency_id="render", concurrency_limit=host.render_slots)
    work = dict(concurrency_id="workflow", concurrency_limit=2)
    buttons["mix"].click(api_mix_fn, [preset, mix_box, *method_inputs], [info], api_name="mix", **opts)
    buttons["render"].click(api_render_fn, [preset, mix_box, *settings, *method_inputs], [gallery, info], api_name="render", **opts)
    buttons["soup"].click(api_soup_fn, [preset, mix_box, *settings, *method_inputs], [image, info], api_name="soup", **opts)
    buttons["session_render"].click(api_session_render_fn, [state, preset, mix_box, *settings, *method_inputs], [state, gallery, info],
                                    api_name="session_render", **opts)
    buttons["add"].click(api_add_fn, [state, preset, name, path], [state, info], api_name="add_shard", **work)
    buttons["remove"].click(api_remove_fn, [state, preset, name], [state, info], api_name="remove_shard", **work)
    buttons["search"].click(api_search_fn, [preset, *search_inputs, *settings, *method_inputs], [image, info], api_name="search", **work)
    buttons["grid"].click(api_grid_fn, [state, preset, mix_box, axis_x, axis_y, *settings, *method_inputs], [state, image], api_name="grid", **work)
