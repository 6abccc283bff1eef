"""The "Find the soup" tab: a search over the ticked shards' mix guided by the visitor's picks (rounds
of candidate soups; BoTorch's pairwise GP proposes the next) or by a scorer (CMA-ES over a budget,
with a live plot of the best score). Plain handlers first, then the tab. The preference search is
kept in the browser (it survives a reload of the same visitor and is no other visitor's)."""

from __future__ import annotations

import html
import threading
import time

import gradio as gr

from ..modelfiles.presets import Recipe, RenderSettings
from ..search.preference import PreferenceSearch
from ..search.run import best_recipe, search, setup
from ..search.space import Space
from . import session as handlers
from .panels import QUIET, Page
from .parts import error_line, restored, user_errors
from .session import Controls, Session, StudioHost

ROUND = 4  # candidates per round


# -- handlers ------------------------------------------------------------------------------------
def space_of(host: StudioHost, session: Session, controls: Controls, groups: bool, params: bool) -> Space:
    """The ticked shards' weights (at least two), with their block groups and the method's numeric
    parameters when asked; ValueError naming what is missing."""
    names = list(controls.ticked(handlers.require(session)))
    studio = host.get(session.preset)
    block_groups = tuple(studio.blocks.groups) if groups and studio.blocks is not None else ()
    method = controls.method
    numeric = list(Space.numeric_params(method)) if params else []
    try:
        return Space.of(names, method, block_groups, numeric)
    except ValueError as err:
        raise ValueError(f"find the soup: {err} (tick the shards to search)") from None


def start(host: StudioHost, session: Session, controls: Controls, groups: bool, params: bool) -> dict:
    """A new preference search over the ticked shards, its first round proposed."""
    space = space_of(host, session, controls, groups, params)
    found = PreferenceSearch(space, seed=controls.settings.seed, size=ROUND)
    found.propose()
    return {"preset": session.preset, "settings": controls.settings.model_dump(), "params": dict(controls.params), "search": found.state()}


def answer(data: dict | None, action: str, index: int | None = None) -> dict:
    """The search after the visitor's answer: "pick" (the round's candidate at `index`), "none"
    (none beats the best so far) or "undo"; the next round proposed after a pick or none."""
    if not data:
        raise ValueError("start a search first")
    found = PreferenceSearch.from_state(data["search"])
    if action == "pick":
        found.pick(found.current.shown[index])
    elif action == "none":
        found.none_better()
    else:
        found.undo()
    if found.current.answered:
        found.propose()
    return {**data, "search": found.state()}


def candidate_image(host: StudioHost, session: Session, data: dict, found: PreferenceSearch, index: int) -> tuple[str, str]:
    """One candidate's soup image (its recipe in the PNG) and caption."""
    studio = host.get(session.preset)
    c = found.candidate(index)
    settings = RenderSettings(**data["settings"])
    mix = studio.make_mix(c.weights, found.space.method, {**data["params"], **c.params}, session.shards, blocks=c.blocks or None)
    rendered = studio.render_soup(mix, settings)
    path, caption = handlers.soup_file(host, rendered, mix, settings)
    session.remember(path, caption, Recipe.of(studio.preset.source, mix, settings))
    return path, f"#{index + 1}: {rendered.label}"


def view(host: StudioHost, session: Session, data: dict | None) -> tuple[list, tuple | None, str]:
    """The current round (images with captions), the best so far (image and caption) and a status line."""
    if not data:
        return [], None, ""
    session = handlers.require(session)
    if data["preset"] != session.preset:
        raise ValueError(f"this search was made on preset {data['preset']!r}: start a new one here")
    missing = [n for n in data["search"]["space"]["shards"] if n not in session.shards]
    if missing:
        raise ValueError(f"this search mixes {missing[0]!r}, which this page no longer has: start a new one")
    found = PreferenceSearch.from_state(data["search"])
    images = [candidate_image(host, session, data, found, i) for i in found.current.shown]
    best = candidate_image(host, session, data, found, found.best) if found.best is not None else None
    picks = sum(r.answered for r in found.rounds)
    status = (f"Round {len(found.rounds)} ({picks} answered): searching {html.escape(found.space.describe())}. "
              "Click the soup you like best, or say none beats the best so far.")
    return images, best, status


def best_controls(host: StudioHost, session: Session, data: dict | None) -> tuple[dict[str, float], Recipe]:
    """The best so far as a recipe for the controls ("Use this mix")."""
    if not data or data["search"]["best"] is None:
        raise ValueError("no best soup yet: pick one in a round first")
    found = PreferenceSearch.from_state(data["search"])
    c = found.candidate(found.best)
    recipe = Recipe(mix={n: w for n, w in c.weights.items() if w > 0}, method=found.space.method, params={**data["params"], **c.params},
                    blocks=c.blocks, render=RenderSettings(**data["settings"]), search=f"found by picks: {found.space.describe()}")
    return handlers.recipe_controls(session, recipe, host.get(session.preset).blocks)


def scorer_search(host: StudioHost, session: Session, controls: Controls, kind: str, target: str, references, budget: int,
                  groups: bool, params: bool, stop: threading.Event, on_candidate) -> tuple:
    """A scorer search of `budget` candidates over the ticked shards with the style or reference
    scorer (a python scorer imports server code: the CLI's only); returns (the best recipe's
    controls, what was found)."""
    session = handlers.require(session)
    if kind not in ("style", "reference"):
        raise ValueError(f"scorer {kind!r}: the page searches with style or reference (python scorers: the CLI's search only)")
    searched = space_of(host, session, controls, groups, params)
    scorer, _, batch = setup(kind, list(searched.shards), controls.settings, target=target,
                             references=list(references or []), method=controls.method)
    studio = host.get(session.preset)
    found = search(studio, searched, scorer, batch, budget=int(budget), seed=controls.settings.seed, shards=session.shards,
                   params=dict(controls.params), stop=stop.is_set, on_candidate=on_candidate)
    recipe = best_recipe(studio, found, controls.settings, session.shards)
    return handlers.recipe_controls(session, recipe, studio.blocks), found


# -- the tab -------------------------------------------------------------------------------------
def find_tab(p: Page) -> None:
    with gr.Tab("Find the soup", elem_id="tab-find"):
        gr.Markdown("A weight is not a look: let the studio find the mix. **By your picks**: each round shows candidate soups of the "
                    "ticked shards (same prompt and seed); click the one you like best, and a preference model (BoTorch's pairwise GP) "
                    "proposes the next round. **By a scorer**: a budget of candidates searched by CMA-ES for a target share of styles "
                    "(the emoji default's style judge) or similarity to reference images (your own scorer: the CLI's `search`).")
        with gr.Row():
            p.find_groups = gr.Checkbox(False, label="search each shard's block groups too", elem_id="find-groups")
            p.find_params = gr.Checkbox(False, label="search the method's numeric parameters too", elem_id="find-params")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    start_button = gr.Button("Start a search by picks", variant="primary", elem_id="find-start")
                    none_button = gr.Button("None beats the best so far", elem_id="find-none")
                    undo_button = gr.Button("Undo the last pick", elem_id="find-undo")
                p.find_status = gr.Markdown(elem_id="find-status")
                p.find_round = gr.Gallery(show_label=False, columns=ROUND, height=220, object_fit="contain", format="png", elem_id="find-round",
                                          elem_classes=["pixelated"], allow_preview=False, buttons=["download"])
            with gr.Column(scale=1, min_width=220):
                p.find_best = gr.Image(label="Best so far", type="filepath", format="png", height=180, interactive=False, elem_id="find-best",
                                       elem_classes=["pixelated"])
                p.find_best_label = gr.Markdown(elem_id="find-best-label")
                use_button = gr.Button("Use this mix", elem_id="find-use")
        p.find_message = gr.Markdown(elem_id="find-message")
        scorer_panel(p)
    wire_picks(p, start_button, none_button, undo_button, use_button)


def wire_picks(p: Page, start_button, none_button, undo_button, use_button) -> None:
    host = p.host
    outputs = [p.find_saved, p.find_round, p.find_best, p.find_best_label, p.find_status, p.find_message]

    def shown(session, data) -> list:
        try:
            images, best, status = view(host, session, data)
        except (ValueError, KeyError) as err:
            return [gr.skip()] * 5 + [error_line(err)]
        return [data, gr.Gallery(value=images, columns=ROUND), best[0] if best else None, html.escape(best[1]) if best else "", status, ""]

    def refused(err) -> list:
        return [gr.skip()] * 5 + [error_line(err)]

    @user_errors
    def on_start(session, groups, params, *values):
        try:
            return shown(session, start(host, session, p.controls_from(values), groups, params))
        except (ValueError, KeyError) as err:
            return refused(err)

    def answered(session, data, action, index=None) -> list:
        try:
            return shown(session, answer(data, action, index))
        except (ValueError, KeyError, IndexError) as err:
            return refused(err)

    @user_errors
    def on_pick(session, data, evt: gr.SelectData):
        return answered(session, data, "pick", evt.index)

    def on_answer(action):
        return user_errors(lambda session, data: answered(session, data, action))

    @user_errors
    def on_use(session, data):
        try:
            mix, recipe = best_controls(host, session, data)
        except (ValueError, KeyError) as err:
            return [gr.skip()] * len(p.restore_outputs) + [error_line(err)]
        return [*restored(session.names, mix, recipe, "")[:-1], "the best so far is on the sliders"]

    work = dict(**QUIET, concurrency_id="render", concurrency_limit=p.host.render_slots)
    start_button.click(on_start, [p.state, p.find_groups, p.find_params, *p.control_inputs], outputs, **work)
    p.find_round.select(on_pick, [p.state, p.find_saved], outputs, **work)
    none_button.click(on_answer("none"), [p.state, p.find_saved], outputs, **work)
    undo_button.click(on_answer("undo"), [p.state, p.find_saved], outputs, **work)
    use_button.click(on_use, [p.state, p.find_saved], [*p.restore_outputs, p.find_message], **QUIET).success(
        p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET).success(**p.picture).success(**p.full, **p.render_opts)
    # A reload: the visitor's search as it was, once the page has its session back.
    p.loaded.then(lambda session, data: shown(session, data) if data else [gr.skip()] * 6, [p.state, p.find_saved], outputs, **QUIET,
                  show_progress="hidden")


def scorer_panel(p: Page) -> None:
    with gr.Accordion("Search with a scorer", open=False, elem_id="find-scorer-panel"):
        with gr.Row():
            kind = gr.Dropdown(["style", "reference"], value="style", label="Scorer (python scorers: the CLI's search only)", elem_id="find-scorer")
            target = gr.Textbox(label="style: target shares", placeholder="twemoji=0.5,openmoji=0.5", elem_id="find-target")
            budget = gr.Number(16, label="Budget (candidates)", precision=0, elem_id="find-budget")
        references = gr.File(label="reference: 1-8 images", file_count="multiple", file_types=["image"], type="filepath", elem_id="find-references")
        with gr.Row():
            run_button = gr.Button("Search", variant="primary", elem_id="find-run")
            stop_button = gr.Button("Stop", elem_id="find-stop")
        plot = gr.LinePlot(x="candidate", y="best score", height=200, elem_id="find-plot")
        tried = gr.Gallery(show_label=False, columns=8, height=200, object_fit="contain", format="png", elem_classes=["pixelated"], allow_preview=False,
                           elem_id="find-tried")
        message = gr.Markdown(elem_id="find-scorer-message")
    wire_scorer(p, kind, target, budget, references, run_button, stop_button, plot, tried, message)


def wire_scorer(p: Page, kind, target, budget, references, run_button, stop_button, plot, tried, message) -> None:
    import queue

    import pandas as pd

    host = p.host
    stops: dict[int, threading.Event] = {}

    def on_run(session, kind_, target_, budget_, refs, groups, params, *values):
        """Runs the search in a thread and streams its candidates: plot, images, progress."""
        stop, news = threading.Event(), queue.Queue()
        stops[id(session)] = stop
        result = {}

        def work():
            try:
                result["found"] = scorer_search(host, session, p.controls_from(values), kind_, target_, refs, budget_ or 0, groups, params,
                                                stop, news.put)
            except Exception as err:  # noqa: BLE001 - shown in the message line
                result["error"] = err
            stops.pop(id(session), None)
            news.put(None)

        threading.Thread(target=work, daemon=True).start()
        rows, images, start, total = [], [], time.monotonic(), int(budget_ or 0)
        while (t := news.get()) is not None:
            rows.append({"candidate": t.index + 1, "best score": max([r["best score"] for r in rows] + [t.score])})
            images.append((handlers.soup_file_of(host, t.image, t.label), f"{t.score:.3f}: {t.label}"))
            left = (time.monotonic() - start) / len(rows) * (total - len(rows))
            said = f"candidate {len(rows)} of {total}: best score {rows[-1]['best score']:.3f}, about {left:.0f} s left"
            yield [pd.DataFrame(rows), images, said] + [gr.skip()] * len(p.restore_outputs)
        if "error" in result:
            yield [gr.skip(), gr.skip(), error_line(result["error"])] + [gr.skip()] * len(p.restore_outputs)
            return
        (mix, recipe), found = result["found"]
        said = f"best of {len(found.tried)}: {html.escape(found.best.label)} (score {found.best.score:.3f}; the plain soup {found.tried[0].score:.3f}), now on the sliders"
        yield [gr.skip(), gr.skip(), said + (f" ({html.escape(found.stopped)})" if found.stopped else "")] + restored(session.names, mix, recipe, "")[:-1]

    def on_stop(session):
        if session is not None and id(session) in stops:
            stops[id(session)].set()

    run_button.click(on_run, [p.state, kind, target, budget, references, p.find_groups, p.find_params, *p.control_inputs],
                     [plot, tried, message, *p.restore_outputs], **QUIET, concurrency_id="workflow", concurrency_limit=2).success(
        p.on_mixture, p.mixture_inputs, [p.mixture], **QUIET).success(**p.soup_only, **p.render_opts)
    stop_button.click(on_stop, [p.state], None, **QUIET, concurrency_limit=None)
