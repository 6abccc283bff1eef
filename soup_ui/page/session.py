"""One visitor's view of the studio, and what the page does, as plain functions.

Shared by everyone: the `StudioHost` (presets, a Studio per preset, the weight pool inside each
Studio, the folders). Owned by one page session: a `Session` (which shards it shows, by name, and
what its components were last rendered with). The Gradio layer (`ui.py`) only wires widgets to
the handlers here, which tests call directly.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..engine import workflows
from ..engine.mix import Mix
from ..engine.pool import Shard
from ..engine.render import Rendered
from ..engine.studio import RuntimeOptions, Studio
from ..files import atomic_path, portable_preset, safe_name
from ..maths.methods import METHODS
from ..modelfiles import checkpoints, formats, pngmeta
from ..modelfiles.presets import (
    Recipe,
    RenderSettings,
    ShardSpec,
    describe_validation_error,
    load_preset,
    load_recipe,
    parse_mix,
    preset_data,
    write_yaml_atomic,
)
from ..modelfiles.presets import save_recipe as write_recipe

logger = logging.getLogger(__name__)

MAX_SHARDS = 24  # shard rows on the page; a session cannot show more


class StudioHost:
    """The presets offered by the page, a Studio per preset (loaded on first use), the folders
    shards may be added from (only those given: nothing is opened implicitly), and where the
    page writes files."""

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
        self.models_dirs = [Path(d).resolve() for d in models_dirs]
        self.output_dir = Path(output_dir or Path.cwd() / "soup-outputs").resolve()  # uploads, exports, saved presets
        self.image_dir = self.output_dir / ".images"  # PNGs served to the page, one folder per content hash
        self._studios: dict[str, Studio] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}  # preset -> held while it loads
        self._image_writes = 0
        self._images = threading.Lock()  # serving an image and pruning old ones
        self.render_slots = 4  # page and API renders at once (one studio's lock orders them; render workers take more)
        for saved in sorted((self.output_dir / "presets").glob("*.yaml")):  # presets saved from the page, by any visitor, before
            self.add_preset(saved)

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
            studio = self._studios.get(name)
            if studio is not None:
                return studio
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one load per preset, outside the host lock: loaded presets and other loads never wait for it
            with self._lock:
                studio = self._studios.get(name)
            if studio is None:
                studio = self.loader(load_preset(self.presets[name]), self.options, progress)
                with self._lock:
                    self._studios[name] = studio
            return studio

    def preload(self, names: list[str]) -> None:
        """Load these presets now (at server start: the first visitor gets a ready page), saying how
        long each took; one that fails is logged and left to fail again, in the page, when chosen."""
        import time

        for name in names:
            start = time.perf_counter()
            try:
                self.get(name)
            except Exception as err:  # noqa: BLE001 - a bad preset must not stop the server
                logger.error("preset %s not loaded at start: %s", name, err)
                continue
            logger.info("preset %s loaded at start in %.1f s", name, time.perf_counter() - start)

    def add_preset(self, path: Path) -> str:
        """Offer a newly saved preset file in the page (for every visitor); returns its key."""
        key = path.stem
        with self._lock:
            while key in self.presets and self.presets[key] != path:
                key += "+"
            self.presets[key] = path
        return key

    # -- folders ----------------------------------------------------------------------------------
    def folder_names(self) -> list[str]:
        """The model folders as the page shows them: by name, never as absolute server paths."""
        return [d.name for d in self.models_dirs]

    def allowed_path(self, text: str) -> Path:
        """A path inside a model folder, given relative to one ("gamma.safetensors",
        "shards/gamma.safetensors") or absolute; ValueError quoting only what the user typed."""
        typed = text.strip()
        if not typed:
            raise ValueError("give a path inside a model folder, or upload a file")
        if not self.models_dirs:
            raise ValueError("no model folders are configured on this server (start it with --models-dir DIR); upload the file instead")
        given = Path(typed).expanduser()
        candidates = [given] if given.is_absolute() else [d / given for d in self.models_dirs]
        if not given.is_absolute() and len(given.parts) > 1:
            candidates += [d / Path(*given.parts[1:]) for d in self.models_dirs if d.name == given.parts[0]]
        inside = [c.resolve() for c in candidates if any(c.resolve().is_relative_to(d) for d in self.models_dirs)]
        if not inside:
            raise ValueError(f"{typed!r} is outside the model folders ({', '.join(self.folder_names())})")
        for path in inside:
            if path.exists():
                return path
        raise ValueError(f"{typed!r}: no such file or folder in the model folders ({', '.join(self.folder_names())})")

    def new_file(self, folder: str, name: str, suffix: str, overwrite: bool = False, owner: str | None = None) -> Path:
        """A path for a file the page writes, inside output_dir (in the `owner` visitor's own folder
        when given: no visitor sees or overwrites another's); an existing file needs `overwrite`."""
        if not name.strip():
            raise ValueError("give a file name")
        stem = safe_name(name)
        path = self.output_dir / folder / (owner or "") / (stem if stem.endswith(suffix) else stem + suffix)
        if path.exists() and not overwrite:
            raise ValueError(f"{folder}/{path.name} exists; tick 'overwrite' to replace it, or choose another name")
        return path

    def shown(self, path: Path) -> str:
        """A path as the page shows it: relative to the output or a model folder."""
        for root in [self.output_dir, *self.models_dirs]:
            if Path(path).resolve().is_relative_to(root):
                return str(Path(root.name) / Path(path).resolve().relative_to(root))
        return Path(path).name

    # -- images the page serves -------------------------------------------------------------------
    def image_file(self, rendered: Rendered, name: str) -> str:
        """Write an image once, whole, under a folder named by its content hash, with a telling file
        name (downloads are named after the shard or the mix and seed, not image.png)."""
        import io

        buffer = io.BytesIO()
        pngmeta.save(rendered.image, buffer)  # with the recipe the image carries
        data = buffer.getvalue()
        folder = self.image_dir / hashlib.sha256(data).hexdigest()[:24]
        path = folder / f"{safe_name(name, 'image')}.png"
        with self._images:  # never while a prune runs: a folder served again is fresh, not deleted under it
            if path.is_file():
                os.utime(folder)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(path, overwrite=True) as tmp:
                    tmp.write_bytes(data)
            self._image_writes += 1
            prune = self._image_writes % 200 == 0
        if prune:
            self.prune_images()
        return str(path)

    def prune_images(self, max_age_s: float = 3600) -> None:
        """Forget served images not served for an hour (Gradio keeps its own copies while in use)."""
        cutoff = time.time() - max_age_s
        with self._images:
            for folder in self.image_dir.glob("*"):
                try:
                    if folder.stat().st_mtime < cutoff:
                        shutil.rmtree(folder, ignore_errors=True)
                except OSError:
                    pass


def shown_params(session: Session | None, method_name: str) -> dict:
    """The method's parameters of the soup on screen (the newest history entry, when made with this
    method), else its defaults, by public name: where a refused value's control goes back to."""
    m = METHODS[method_name]
    values = {f.alias or n: f.default for n, f in m.params.model_fields.items()}
    if session is not None and session.history and session.history[0][2].method == method_name:
        values.update(session.history[0][2].params)
    return values


def short_caption(recipe) -> str:
    """A history caption: the method (unless the average), each shard's percent, block weights, seed."""
    total = sum(recipe.mix.values()) or 1.0
    method = "" if recipe.method == "average" else f"{recipe.method} "
    shares = " ".join(f"{n} {round(100 * w / total)}" for n, w in recipe.mix.items() if w > 0)
    return f"{method}{shares}{' +blocks' if recipe.blocks else ''} · s{recipe.render.seed}"


TICKETS = threading.Lock()  # numbering render requests (any session's: a moment each; a lock per session would not deep-copy)


@dataclass
class Session:
    """What one page session shows: its shards by name (in row order) and what its components
    were last rendered with. Shards it added itself hold a use of their pooled weights."""

    preset: str
    shards: dict[str, Shard] = field(default_factory=dict)
    owned: set[str] = field(default_factory=set)
    rendered: tuple | None = None  # (names, settings) of the components on the page
    tickets: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)
    latest: int = 0  # the newest render request of this page
    history: list = field(default_factory=list)  # this page's soups, newest first: (image path, caption, Recipe)
    visitor: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # its own folder for recipes and exports

    HISTORY = 24  # soups kept in the history strip

    def remember(self, path: str, caption: str, recipe) -> None:
        """One entry per distinct soup (mix, method, parameters, block weights, settings): seen again,
        it moves to the front instead of being added again."""
        self.history = [h for h in self.history if h[0] != path and h[2] != recipe]
        self.history.insert(0, (path, caption, recipe))
        del self.history[self.HISTORY :]

    def history_items(self) -> list[tuple[str, str]]:
        """The history strip: each soup with a caption that tells it apart in a few words."""
        return [(path, short_caption(recipe)) for path, _, recipe in self.history]

    @property
    def names(self) -> list[str]:
        return list(self.shards)

    def ticket(self) -> int:
        """Number a render request; renders of one page may run at once and finish out of order.
        `latest` only ever grows: drawing a number and recording it happen under one lock (between
        the two, a later request could record its number first, and an older render be shown last)."""
        with TICKETS:
            number = next(self.tickets)
            self.latest = max(self.latest, number)
        return number

    def superseded(self, ticket: int) -> bool:
        """Whether a newer render request of this page exists: then this one's images must not be shown."""
        return ticket < self.latest


@dataclass(frozen=True)
class Controls:
    """The page's mix and render controls, as typed values (rows in the session's order)."""

    flags: tuple[bool, ...]
    weights: tuple[float, ...]
    method: str = "average"
    params: tuple[tuple[str, object], ...] = ()  # the method's parameters as (name, value), validated by the Mix
    settings: RenderSettings = RenderSettings()
    text_encoders: bool = False  # "mix text encoders too"
    blocks: tuple[str, ...] = ()  # per row, its block weights as entered ("" or all 1: none)

    def ticked(self, session: Session) -> dict[str, float]:
        """{name: weight} of the ticked rows."""
        return {n: float(self.weights[i]) for i, n in enumerate(session.names) if i < len(self.flags) and self.flags[i]}

    def ticked_blocks(self, session: Session) -> dict[str, str]:
        """{name: block weights} of the ticked rows that have some."""
        ticked = self.ticked(session)
        return {n: self.blocks[i].strip() for i, n in enumerate(session.names) if n in ticked and i < len(self.blocks) and (self.blocks[i] or "").strip()}

    def mix(self, session: Session, block_map=None) -> Mix:
        """The request's Mix, built once here: the ticked rows over this session's shards, with their
        block weights over the denoiser's `block_map`."""
        return Mix.build(session.shards, self.ticked(session), self.method, dict(self.params), self.text_encoders, self.ticked_blocks(session), block_map)


def page_mix(host: StudioHost, session: Session, controls: Controls) -> Mix:
    """The request's Mix over the session's shards, its block weights read against the preset's denoiser."""
    return controls.mix(session, host.get(session.preset).blocks)


def settings_from(prompt, negative, seed, steps, guidance, scheduler, height, width) -> RenderSettings:
    """RenderSettings from widget values; ValueError naming each bad value (no clamping)."""
    values = dict(prompt=prompt or "", negative_prompt=negative or "", seed=seed, steps=steps, guidance_scale=guidance,
                  scheduler=scheduler, height=height, width=width)
    for key in ("seed", "steps", "height", "width"):
        if values[key] is None:
            raise ValueError(f"settings: {key}: give a whole number")
        if isinstance(values[key], float) and values[key].is_integer():
            values[key] = int(values[key])
    try:
        return RenderSettings(**values)
    except ValidationError as err:
        raise ValueError(describe_validation_error("settings", err).replace("\n", "; ")) from None


# -- sessions ---------------------------------------------------------------------------------------
def open_session(host: StudioHost, preset: str | None, previous: Session | None = None, progress=None) -> Session:
    """A new view on a preset (its shards); what `previous` added is given back."""
    studio = host.get(preset, progress)
    close_session(host, previous)
    kept = {"visitor": previous.visitor} if previous is not None else {}  # a preset switch keeps the visitor's own folder
    return Session(preset or host.default, dict(studio.shards), **kept)


def close_session(host: StudioHost, session: Session | None) -> None:
    """Give back the weights this session added (called when the page closes or switches preset)."""
    if session is None:
        return
    studio = host._studios.get(session.preset)
    for name in list(session.owned):
        shard = session.shards.pop(name, None)
        if studio is not None and shard is not None:
            studio.pool.release(shard.weights)
    session.owned.clear()


def require(session: Session | None) -> Session:
    if session is None:
        raise ValueError("the page is still loading; try again in a moment")
    return session


def add_shard(host: StudioHost, session: Session, name: str, path_text: str = "", upload: str | None = None) -> str:
    """Validate a UNet and show it in this session only (its weights are pooled: loaded once for
    everyone who adds the same file). An upload is validated before it is kept, and Gradio's
    temporary copy is deleted either way. Returns the message for the page."""
    session = require(session)
    studio = host.get(session.preset)
    name = (name or "").strip()
    try:
        ShardSpec(name=name, path=Path("x"))
    except ValidationError:
        raise ValueError(f"shard name {name!r}: use letters, digits and _.+- (at most 64), starting with a letter or digit") from None
    if name in session.shards:
        raise ValueError(f"this session already has a shard named {name!r}; choose another name")
    if len(session.shards) >= MAX_SHARDS:
        raise ValueError(f"this page shows at most {MAX_SHARDS} shards; remove one first")
    if upload:
        try:
            path = keep_upload(host, studio, name, Path(upload))
        finally:
            Path(upload).unlink(missing_ok=True)
        shown = f"upload {path.name}"
    else:
        path = host.allowed_path(path_text or "")
        shown = path_text.strip()
    try:
        weights = studio.pool.load(path, name)
    except checkpoints.CheckpointError as err:
        raise ValueError(str(err).replace(str(path), shown)) from None
    session.shards[name] = Shard(name, weights, 1.0, f"added from {host.shown(path)}")
    session.owned.add(name)
    return f"added shard **{name}** ({weights.kind}) from `{shown}` (in this session only)"


# -- what survives a reload: kept in the visitor's browser (gr.BrowserState) -------------------------
def saved_state(session: Session) -> dict | None:
    """The page as its browser keeps it: preset, the last soup's recipe and the shards this page
    added (name and path: a model folder's file, or an upload kept on the server)."""
    if not session.history:
        return None
    added = [[n, str(session.shards[n].path)] for n in session.shards if n in session.owned]
    history = [[path, caption, recipe.model_dump(mode="json")] for path, caption, recipe in session.history]
    return {"preset": session.preset, "recipe": session.history[0][2].model_dump(mode="json"), "added": added, "history": history}


def restore_history(host: StudioHost, session: Session, saved: dict | None) -> int:
    """Put back a reloaded page's history: the entries whose images the server still serves (inside
    its image folder; anything else the browser sends is ignored) and whose shards this page has."""
    session = require(session)
    if not saved or saved.get("preset") != session.preset:
        return 0
    kept = []
    for item in saved.get("history", [])[: Session.HISTORY]:
        try:
            path, caption, data = item
            recipe = Recipe.model_validate(data)
            image = Path(path).resolve()
        except (ValueError, TypeError, ValidationError):
            continue
        if image.is_relative_to(host.image_dir.resolve()) and image.is_file() and all(n in session.shards for n in recipe.mix):
            kept.append((str(image), str(caption), recipe))
    restored_paths = {k[0] for k in kept}
    session.history = kept + [h for h in session.history if h[0] not in restored_paths]
    return len(kept)


def restore_shards(host: StudioHost, session: Session, saved: dict | None) -> list[str]:
    """Add back the shards a reloaded page had added (files still in a model folder or kept
    uploads); returns one line per shard that could not be (gone, moved, invalid)."""
    session = require(session)
    if not saved or saved.get("preset") != session.preset:
        return []
    uploads = host.output_dir / "uploads"
    studio = host.get(session.preset)
    lost = []
    for name, path_text in saved.get("added", []):
        if name in session.shards:
            continue
        try:
            path = Path(path_text)
            if not (path.resolve().is_relative_to(uploads) and path.is_file()):
                path = host.allowed_path(path_text)
            session.shards[name] = Shard(name, studio.pool.load(path, name), 1.0, f"added from {host.shown(path)}")
            session.owned.add(name)
        except (ValueError, checkpoints.CheckpointError) as err:
            lost.append(f"{name}: {err}")
    return lost


def saved_recipe(session: Session, saved: dict | None) -> tuple[dict[str, float], Recipe] | None:
    """The mix and settings a reloaded page had, if they still fit its shards."""
    if not saved or saved.get("preset") != require(session).preset:
        return None
    try:
        return recipe_controls(session, Recipe.model_validate(saved["recipe"]))
    except (ValueError, KeyError, ValidationError):
        return None


def keep_upload(host: StudioHost, studio: Studio, name: str, upload: Path) -> Path:
    """Validate an uploaded checkpoint (format, names, shapes, finiteness), then keep it under uploads/
    named by its content, so that no name is ever blocked and the same upload is kept once."""
    if upload.suffix.lower() != ".safetensors":
        raise ValueError(f"{upload.name}: upload a .safetensors file (pickle checkpoints are refused)")
    try:
        formats.validate(upload, studio.hybrid.config, studio.base_specs, name)
    except checkpoints.CheckpointError as err:
        raise ValueError(str(err).replace(str(upload), upload.name)) from None
    kept = host.output_dir / "uploads" / f"{safe_name(name)}-{checkpoints.sha256_file(upload)[:12]}.safetensors"
    if not kept.is_file():
        with atomic_path(kept, overwrite=True) as tmp:
            shutil.copyfile(upload, tmp)
    return kept


def remove_shard(host: StudioHost, session: Session, name: str) -> str:
    """Hide a shard in this session (unlearning is a re-average); its weights are freed when no
    one uses them, its file is untouched."""
    session = require(session)
    name = (name or "").strip()
    if name not in session.shards:
        raise ValueError(f"this session has no shard named {name!r} (it has: {', '.join(session.shards)})")
    if len(session.shards) == 1:
        raise ValueError("a session keeps at least one shard; add another before removing this one")
    shard = session.shards.pop(name)
    if name in session.owned:
        session.owned.discard(name)
        host.get(session.preset).pool.release(shard.weights)
    before = len(session.history)
    session.history = [h for h in session.history if name not in h[2].mix]  # soups of it can no longer be restored here
    gone = before - len(session.history)
    return f"removed shard **{name}** from this session (its file is untouched)" + (f"; {gone} soups with it left the history" if gone else "")


# -- rendering --------------------------------------------------------------------------------------
def soup_caption(label: str, settings: RenderSettings) -> str:
    """The soup's label with what it was rendered from: the recipe, the seed and the prompt."""
    prompt = settings.prompt if len(settings.prompt) <= 60 else settings.prompt[:57] + "..."
    return f"{label} · seed {settings.seed} · “{prompt}”"


@dataclass
class Images:
    """What a render puts on the page: file paths with captions (None: leave as shown)."""

    components: list[tuple[str, str]] | None
    soup: tuple[str, str] | None
    note: str = ""
    superseded: bool = False  # a newer request of the same page came in: show nothing of this one
    empty: bool = False  # nothing to mix (no shard ticked with a weight): an empty state, not an error


SUPERSEDED = Images(None, None, superseded=True)
NOTHING_TO_MIX = Images(None, None, "Nothing to mix: no shard is ticked with a positive weight. The images shown are of the last mix.", empty=True)


def nothing_to_mix(session: Session, controls: Controls) -> bool:
    """Whether no ticked row has a positive weight; ValueError first for a weight out of range (a
    typed -1 beside a 1 summed to 0 and read "nothing to mix")."""
    from ..maths.soup import checked_weight

    ticked = controls.ticked(session)
    for name, w in ticked.items():
        checked_weight(name, w)
    return sum(ticked.values()) <= 0


def image_files(host: StudioHost, results: list[Rendered], settings: RenderSettings) -> list[tuple[str, str]]:
    return [(host.image_file(r, f"{r.label}-seed{settings.seed}"), r.label) for r in results]


def soup_file_of(host: StudioHost, image, label: str) -> str:
    """A soup image that carries its recipe (a search's candidate), written for the page."""
    return host.image_file(Rendered(label, image, "soup"), label[:100])


def soup_file(host: StudioHost, soup: Rendered, mix: Mix, settings: RenderSettings) -> tuple[str, str]:
    method = "" if mix.method.name == "average" else f"{mix.method.name}-"
    blocks = "-blocks" if mix.blocked else ""
    name = f"soup-{method}" + "-".join(f"{n}{round(100 * w)}" for n, w in zip(mix.names, mix.shares) if w > 0) + f"{blocks}-seed{settings.seed}"
    return host.image_file(soup, name[:120]), soup_caption(soup.label, settings)


def compare(host: StudioHost, session: Session, controls: Controls, name: str) -> tuple[str, str]:
    """The component `name` and the soup of the current mix, as one A/B pair (from the cache when shown)."""
    session = require(session)
    name = name.strip() or next(iter(controls.ticked(session)), "")
    if name not in session.shards:
        raise ValueError(f"compare the soup with which shard? {name!r} is not one of this page's ({', '.join(session.shards)})")
    if nothing_to_mix(session, controls):
        raise ValueError("nothing to compare: tick a shard with a positive weight")
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls)
    component = studio.render_component(session.shards[name], controls.settings, text_encoders=mix.text_encoders)
    soup = studio.render_soup(mix, controls.settings)
    return image_files(host, [component], controls.settings)[0][0], soup_file(host, soup, mix, controls.settings)[0]


def download_all(host: StudioHost, session: Session, controls: Controls) -> str:
    """One zip of what the page shows: each component and the soup (PNGs that carry their recipe)
    and the recipe as YAML; the images come from the cache when they are shown already."""
    import io
    import zipfile

    import yaml

    session = require(session)
    if nothing_to_mix(session, controls):
        raise ValueError("nothing to download: tick a shard with a positive weight")
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls)
    results = studio.render(mix, controls.settings)
    stem = Path(soup_file(host, results[-1], mix, controls.settings)[0]).stem
    path = host.output_dir / "downloads" / f"{stem}.zip"
    recipe = Recipe.of(studio.preset.source, mix, controls.settings).model_dump(mode="json")
    if recipe["preset"]:  # portable: a preset of the presets folder by its name there (found by load_recipe on any checkout)
        recipe["preset"] = portable_preset(recipe["preset"])
    if not recipe["search"]:
        del recipe["search"]
    with atomic_path(path, overwrite=True) as tmp, zipfile.ZipFile(tmp, "w") as z:
        for r in results:
            buffer = io.BytesIO()
            pngmeta.save(r.image, buffer)
            z.writestr(f"{stem}.png" if r.kind == "soup" else f"{safe_name(r.label)}.png", buffer.getvalue())
        z.writestr("recipe.yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    return str(path)


def text_note(mix: Mix) -> str:
    """What "Mix text encoders too" does for this mix, when it does nothing (it did so silently)."""
    if mix.text_encoders and not any(s.weights.text_found is not None for s in mix.shards):
        return ("“Mix text encoders too” changes nothing here: none of the ticked shards has a text encoder of its own "
                "(UNet files and LoRAs use the base's).")
    return ""


def generate(host: StudioHost, session: Session, controls: Controls, progress=None, ticket: int | None = None, mix: Mix | None = None) -> Images:
    """Every ticked component and the soup, from the same noise (`mix`: the request's, when the
    caller built it already). Superseded (nothing to show) when a newer request of the same page
    came in meanwhile."""
    session = require(session)
    ticket = session.ticket() if ticket is None else ticket
    if mix is None and nothing_to_mix(session, controls):
        return NOTHING_TO_MIX
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls) if mix is None else mix
    results = studio.render(mix, controls.settings, progress)
    if session.superseded(ticket):
        return SUPERSEDED
    session.rendered = (tuple(mix.names), controls.settings, controls.text_encoders)
    soup = soup_file(host, results[-1], mix, controls.settings)
    session.remember(*soup, Recipe.of(studio.preset.source, mix, controls.settings))
    return Images(image_files(host, results[:-1], controls.settings), soup, text_note(mix))


def render_soup(host: StudioHost, session: Session, controls: Controls) -> Images:
    """The soup alone (a slider, the method, a parameter); when the components on the page were
    rendered with other settings or shards, they are rendered again too (from the cache when
    they can), so that soup and components always correspond."""
    session = require(session)
    ticket = session.ticket()
    if nothing_to_mix(session, controls):
        return NOTHING_TO_MIX
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls)
    if session.rendered is not None and session.rendered != (tuple(mix.names), controls.settings, controls.text_encoders):
        return generate(host, session, controls, ticket=ticket, mix=mix)
    soup = studio.render_soup(mix, controls.settings)
    if session.superseded(ticket):
        return SUPERSEDED
    note = "" if session.rendered else "Components are not rendered yet: press Generate to see them beside the soup."
    shown = soup_file(host, soup, mix, controls.settings)
    session.remember(*shown, Recipe.of(studio.preset.source, mix, controls.settings))
    return Images(None, shown, " ".join(n for n in (note, text_note(mix)) if n))


# -- the paper's workflows ------------------------------------------------------------------------
def leave_one_out(host: StudioHost, session: Session, controls: Controls, progress=None) -> list[tuple[str, str]]:
    session = require(session)
    results = workflows.leave_one_out(host.get(session.preset), page_mix(host, session, controls), controls.settings, progress)
    return image_files(host, results, controls.settings)


def interpolate(host: StudioHost, session: Session, controls: Controls, start: str, end: str, count: int, progress=None):
    session = require(session)
    if not (end or "").strip():
        raise ValueError("give the mix to interpolate to ('To'): a shard, a mix a=0.5,b=0.5, or 'soup'")
    mix = page_mix(host, session, controls)
    ends = [mix if text.strip() in ("", "soup") else mix.reweighted(parse_mix(text)) for text in (start, end)]
    results = workflows.interpolate(host.get(session.preset), ends[0], ends[1], int(count), controls.settings, progress)
    return image_files(host, results, controls.settings)


def grid(host: StudioHost, session: Session, controls: Controls, x_text: str, y_text: str, progress=None) -> str:
    from ..engine.sheet import grid as grid_sheet

    session = require(session)
    x, y = workflows.Axis.parse(x_text), workflows.Axis.parse(y_text)
    rows, row_labels, col_labels = workflows.grid(host.get(session.preset), page_mix(host, session, controls), controls.settings, x, y, progress)
    sheet = grid_sheet([[r.image for r in row] for row in rows], row_labels, col_labels)
    return host.image_file(Rendered("grid", sheet, "grid"), f"grid-{x.kind}-{y.kind}-seed{controls.settings.seed}")


def block_sweep(host: StudioHost, session: Session, controls: Controls, a: str, b: str, progress=None) -> list[tuple[str, str]]:
    """Shard `a`, then `a` with each group of blocks from `b`, then `b` (workflows.block_sweep)."""
    session = require(session)
    a, b = (a or "").strip(), (b or "").strip()
    for label, name in (("A", a), ("B", b)):
        if name not in session.shards:
            raise ValueError(f"block sweep: shard {label} {name!r} is not one of this page's ({', '.join(session.shards)})")
    studio = host.get(session.preset)
    mix = Mix.build(session.shards, {a: 1.0, b: 1.0}, "average", None, controls.text_encoders, None, studio.blocks)
    return image_files(host, workflows.block_sweep(studio, mix, a, b, controls.settings, progress), controls.settings)


def ensemble(host: StudioHost, session: Session, controls: Controls) -> list[tuple[str, str]]:
    session = require(session)
    ens, soup = host.get(session.preset).render_ensemble(page_mix(host, session, controls), controls.settings)
    return image_files(host, [ens, soup], controls.settings)


# -- files ----------------------------------------------------------------------------------------
def save_recipe(host: StudioHost, session: Session, controls: Controls, file_name: str, overwrite: bool) -> tuple[str, str]:
    session = require(session)
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls)  # validated before anything is written
    path = host.new_file("recipes", file_name, ".yaml", overwrite, session.visitor)
    recipe = Recipe.of(studio.preset.source, mix, controls.settings)
    write_recipe(recipe, path, overwrite=True)
    return str(path), f"saved the recipe to `{host.shown(path)}`"


def export_unet(host: StudioHost, session: Session, controls: Controls, file_name: str, overwrite: bool, single_file: bool = False) -> tuple[str, str]:
    """The soup UNet as .safetensors in diffusers' naming, or (`single_file`) the whole pipeline as
    one fp16 checkpoint in the original LDM naming, for A1111, Forge and ComfyUI."""
    session = require(session)
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls)
    # The two formats never share a name: NAME.safetensors is the checkpoint A1111 users expect,
    # the UNet alone is NAME-unet.safetensors (one export used to refuse the other as "exists").
    stem = safe_name(file_name).removesuffix(".safetensors") if file_name.strip() else ""
    if stem and not single_file and not stem.endswith("-unet"):
        stem += "-unet"
    path = host.new_file("exports", stem, ".safetensors", overwrite, session.visitor)
    studio.export("single-file" if single_file else "unet", mix, path, overwrite=True)  # new_file refused a clash unless asked
    what = "a single-file checkpoint (LDM naming, fp16) for A1111, Forge and ComfyUI" if single_file else mix.label
    return str(path), f"wrote `{host.shown(path)}` ({what})"


def export_pipeline(host: StudioHost, session: Session, controls: Controls, file_name: str, overwrite: bool) -> tuple[str, str]:
    session = require(session)
    studio = host.get(session.preset)
    mix = page_mix(host, session, controls)
    folder = host.new_file("pipelines", file_name, "", overwrite, session.visitor)
    studio.export("pipeline", mix, folder, overwrite=overwrite)
    from ..engine.studio import folder_variant

    archive = zip_folder(folder)
    variant = folder_variant(folder)
    return str(archive), (f"wrote the pipeline folder `{host.shown(folder)}` (and `{archive.name}` to download); load it with "
                          "`DiffusionPipeline.from_pretrained`" + (f' (variant="{variant}")' if variant else ""))


def zip_folder(folder: Path) -> Path:
    """The folder as one .zip beside it (stored, not compressed: safetensors do not compress), for download."""
    import zipfile

    out = folder.with_suffix(".zip")
    with atomic_path(out, overwrite=True) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            z.write(file, Path(folder.name) / file.relative_to(folder))
    return out


def save_preset(host: StudioHost, session: Session, controls: Controls, file_name: str, overwrite: bool) -> tuple[str, str]:
    """Save the ticked shards with their current weights as a new preset, offered in the page.
    Returns (its key in the preset list, the message)."""
    session = require(session)
    studio = host.get(session.preset)
    mix = controls.ticked(session)
    if not mix:
        raise ValueError("tick at least one shard to save as a preset")
    path = host.new_file("presets", file_name, ".yaml", overwrite)
    shards = [ShardSpec(name=n, path=session.shards[n].path, weight=w, description=session.shards[n].description) for n, w in mix.items()]
    description = f"{len(shards)} shards saved from {studio.preset.name or session.preset}: {', '.join(s.name for s in shards)}"
    preset = studio.preset.model_copy(update={"shards": shards, "name": Path(path).stem, "description": description,
                                              "mix_text_encoders": controls.text_encoders})
    write_yaml_atomic(preset_data(preset, path.parent), path, overwrite=True)
    key = host.add_preset(path)
    return key, f"saved the preset `{host.shown(path)}` ({len(shards)} shards with their current weights); it is in the preset list of every page"


def history_recipe(session: Session, index: int) -> tuple[dict[str, float], Recipe]:
    """The mix and settings of the history strip's image `index` (newest first)."""
    session = require(session)
    if not 0 <= index < len(session.history):
        raise ValueError("that image is no longer in this page's history")
    return recipe_controls(session, session.history[index][2])


def load_recipe_controls(host: StudioHost, session: Session, path: str) -> tuple[dict[str, float], Recipe]:
    """A recipe's mix and settings, checked against this session's shards (its method and
    parameters were validated when the file was read)."""
    return recipe_controls(require(session), load_recipe(path), host.get(session.preset).blocks)


def recipe_controls(session: Session, recipe: Recipe, block_map=None) -> tuple[dict[str, float], Recipe]:
    """The recipe's mix, checked as a render checks it (its block weights too, given the denoiser's
    `block_map`), and the recipe."""
    unknown = [n for n in recipe.mix if n not in session.shards]
    if unknown:
        raise ValueError(f"the recipe names shards this session does not have: {', '.join(unknown)}")
    Mix.build(session.shards, recipe.mix, recipe.method, recipe.params, recipe.text_encoders,
              recipe.blocks if block_map is not None else None, block_map)  # the same checks a render makes
    return dict(recipe.mix), recipe


# -- block weights on the page ------------------------------------------------------------------------
def block_vectors(block_map, lines: dict[str, str]) -> tuple[dict[str, tuple[float, ...]], str]:
    """Each row's block weights read from its line ({name: vector}; empty lines: none), and the
    first problem as a message ("" when none)."""
    out, problem = {}, ""
    for name, line in lines.items():
        if not (line or "").strip():
            continue
        try:
            out[name] = block_map.parse(line, name)
        except ValueError as err:
            problem = problem or str(err)
    return out, problem


def blocks_picture(block_map, names: list[str], lines: dict[str, str], colours: list[str], weights: dict[str, float] | None = None) -> str:
    """The denoiser's blocks in order, one row per ticked shard (`names`, with `colours`: the
    mixture bar's), each cell the shard's share of that block as its colour (full colour 100%, white
    0; multiplier and share on hover): the multipliers times the row weights, normalized per block.
    Blocks where every ticked shard is 0 are named: they keep the base's weights."""
    import html as html_

    from ..engine.mix import share_runs
    from ..maths.soup import rounded_shares

    if block_map is None:
        return "<small>this denoiser has no block map: block weights are unavailable</small>"
    vectors, problem = block_vectors(block_map, {n: lines.get(n, "") for n in names})
    multipliers = [vectors.get(n, (1.0,) * len(block_map)) for n in names]
    given = [max(0.0, float((weights or {}).get(n, 1.0))) for n in names]
    shares = []
    for j, b in enumerate(block_map.ids):
        scaled = [w * m[j] for w, m in zip(given, multipliers)]
        total = sum(scaled)
        shares.append((b, tuple(rounded_shares([x / total for x in scaled])) if total > 0 else None))
    head = "".join(f"<th title='{b}'><span>{html_.escape(b)}</span></th>" for b in block_map.ids)
    rows = []
    for i, name in enumerate(names):
        cells = "".join(
            f"<td title='{html_.escape(name)} {b}: x{m:g}, share {0 if v is None else v[i]:.0%}' "
            f"style='background:{colours[i]};opacity:{0.08 + 0.92 * (0 if v is None else v[i]):.2f}'></td>"
            for (b, v), m in zip(shares, multipliers[i])
        )
        rows.append(f"<tr><th class='who'>{html_.escape(name)}</th>{cells}</tr>")
    zero = [b for b, v in shares if names and v is None]
    notes = []
    if any(n in vectors for n in names):
        notes.append(f"each block's share (multiplier x weight, normalized per block): {html_.escape(share_runs(names, shares))}")
    if zero:
        notes.append(f"every ticked shard is 0 in {', '.join(zero)}: there the soup keeps the base's weights")
    if problem:
        notes.append(f"<span class='error-line'>{html_.escape(problem)}</span>")
    caption = "".join(f"<div>{n}</div>" for n in notes)
    return (f"<div class='blocks-picture'><table><tr><th></th>{head}</tr>{''.join(rows)}</table>"
            f"<small>{html_.escape(block_map.outline)} (input to output)</small>{caption}</div>")
