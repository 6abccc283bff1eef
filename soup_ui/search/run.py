"""The scorer search: a fixed budget of candidate mixes, proposed by CMA-ES (the `cmaes` package,
bounded to the space's unit cube) or drawn at random, each rendered for the same prompts and seeds
and scored; the plain soup (equal weights) is the first candidate, so the best found is never worse.
Same seed, same candidates, same result. Candidates of one generation render at once across render
workers when the studio has them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..modelfiles import pngmeta
from ..modelfiles.presets import Recipe, RenderSettings
from .scorers import Scored, ScorerError
from .space import Candidate, Space

logger = logging.getLogger(__name__)
STRATEGIES = ("cmaes", "random")


@dataclass
class Tried:
    """One candidate: its decoded mix, score and details, and its first image."""

    index: int
    candidate: Candidate
    score: float
    details: dict
    label: str
    image: object = field(repr=False, default=None)

    def row(self) -> dict:
        return {"index": self.index, "score": round(self.score, 6), "mix": self.candidate.weights, "blocks": self.candidate.blocks,
                "params": self.candidate.params, "label": self.label, **self.details}


@dataclass
class Found:
    """A search's outcome: every candidate tried (in order), the best, and why it stopped."""

    space: Space
    tried: list[Tried]
    fixed: dict = field(default_factory=dict)  # the method's parameters not searched
    stopped: str = ""  # why it ended early ("" when the budget was spent)

    @property
    def best(self) -> Tried:
        return max(self.tried, key=lambda t: (t.score, -t.index))


def mix_of(studio, space: Space, candidate: Candidate, shards=None, fixed: dict | None = None):
    return studio.make_mix(candidate.weights, space.method, {**(fixed or {}), **candidate.params}, shards, blocks=candidate.blocks or None)


def render_all(studio, mixes: list, batch: list[RenderSettings]) -> list[list]:
    """Each mix's images for `batch`: at once across render workers (a routed studio), else in turn."""
    if getattr(studio, "workers", None) is not None:
        with ThreadPoolExecutor(len(mixes)) as pool:
            return list(pool.map(lambda m: studio.render_soup_batch(m, batch), mixes))
    return [studio.render_soup_batch(m, batch) for m in mixes]


def search(studio, space: Space, scorer: Callable[[list, list[str]], Scored], batch: list[RenderSettings], *, budget: int, seed: int = 0,
           strategy: str = "cmaes", shards=None, params: dict | None = None, progress: Callable[[float, str], None] | None = None,
           stop: Callable[[], bool] | None = None, on_candidate: Callable[[Tried], None] | None = None) -> Found:
    """Spend `budget` candidates searching `space` for the mix whose images of `batch` (prompts and
    seeds) `scorer` likes best. A scorer that fails or a `stop()` ends the search early, keeping what
    it found (`Found.stopped` says why); a scorer that fails before any candidate is scored raises
    ScorerError (there is nothing to keep)."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1 candidate, got {budget}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if not batch:
        raise ValueError("a search needs at least one prompt and seed to render")
    report = progress or (lambda f, d: None)
    prompts = [s.prompt for s in batch]
    rng = np.random.default_rng(seed)
    found = Found(space, [], dict(params or {}))
    t0 = time.monotonic()
    optimizer = None
    if strategy == "cmaes" and budget > 1:
        from cmaes import CMA

        population = max(4, min(8, 4 + int(3 * np.log(space.dims))))
        optimizer = CMA(mean=np.array(space.start()), sigma=0.3, bounds=np.array([[0.0, 1.0]] * space.dims), seed=seed, population_size=population)
    pending = [np.array(space.start())]  # the plain soup first
    while len(found.tried) < budget:
        if not pending:
            size = optimizer.population_size if optimizer is not None else 4
            pending = [optimizer.ask() if optimizer is not None else rng.uniform(0, 1, space.dims) for _ in range(size)]
        points = pending[: budget - len(found.tried)]
        pending = pending[len(points) :]
        candidates = [space.decode(x) for x in points]
        try:
            mixes = [mix_of(studio, space, c, shards, found.fixed) for c in candidates]
            images = render_all(studio, mixes, batch)
            scored = [scorer(ims, prompts) for ims in images]
        except ScorerError as err:
            if not found.tried:
                raise ScorerError(f"the search found nothing: {err}") from None
            found.stopped = str(err)
            logger.warning("search stopped: %s", err)
            break
        for x, c, m, ims, s in zip(points, candidates, mixes, images, scored):
            image = pngmeta.attach(ims[0], Recipe.of(studio.preset.source, m, batch[0]), m.label, m.model_hash)  # its recipe in the PNG
            tried = Tried(len(found.tried), c, s.score, s.details, m.label, image)
            found.tried.append(tried)
            if on_candidate is not None:
                on_candidate(tried)
        if optimizer is not None and len(points) == optimizer.population_size:
            optimizer.tell([(x, -s.score) for x, s in zip(points, scored)])  # cmaes minimizes
        elapsed = time.monotonic() - t0
        done = len(found.tried)
        report(done / budget, f"candidate {done}/{budget}, best {found.best.score:.3f}, about {elapsed / done * (budget - done):.0f} s left")
        if stop is not None and stop():
            found.stopped = "stopped"
            break
    return found


def best_recipe(studio, found: Found, settings: RenderSettings, shards=None) -> Recipe:
    """The best candidate as a recipe (loadable with --recipe, like every recipe), naming what was searched."""
    best = found.best
    mix = mix_of(studio, found.space, best.candidate, shards, found.fixed)
    recipe = Recipe.of(studio.preset.source, mix, settings)
    return recipe.model_copy(update={"search": f"found by a search of {found.space.describe()}: score {best.score:.4f} "
                                              f"(candidate {best.index + 1} of {len(found.tried)})"})


def write_log(found: Found, path) -> None:
    """Every candidate (mix, blocks, parameters, score and details): CSV, or JSON for a .json path."""
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    rows = [t.row() for t in found.tried]
    if path.suffix == ".json":
        path.write_text(json.dumps({"searched": found.space.describe(), "stopped": found.stopped, "candidates": rows}, indent=1) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "score", "label", "mix", "blocks", "params", "details"])
        for r in rows:
            rest = {k: v for k, v in r.items() if k not in ("index", "score", "label", "mix", "blocks", "params")}
            writer.writerow([r["index"], r["score"], r["label"], json.dumps(r["mix"]), json.dumps(r["blocks"]), json.dumps(r["params"]), json.dumps(rest)])


def best_sheet(found: Found, count: int = 8):
    """The best `count` candidates' first images, best first, each labelled with its score and mix."""
    from ..engine.sheet import labelled_strip

    ranked = sorted(found.tried, key=lambda t: (-t.score, t.index))[:count]
    return labelled_strip([(f"#{t.index + 1} score {t.score:.3f}: {t.label}", t.image) for t in ranked],
                          title=f"best of {len(found.tried)} candidates; searched {found.space.describe()}")


def setup(spec: str, names: list[str], settings: RenderSettings, *, target: str | None = None, references=(), encoder=None,
          method: str = "average", search_params=(), prompts=(), count: int = 4):
    """A scorer search's scorer, space (without block groups: they need the studio's denoiser) and the
    prompts to render, every check made before any model loads (ValueError naming what is wrong). The
    style scorer renders `count` of the held-out emoji names its judges never saw (seeded by the
    settings' seed) and judges their categories too, unless prompts are given."""
    import random

    from .scorers import make_scorer, style_prompts

    scorer = make_scorer(spec, target=target, references=references, encoder=encoder)
    space = Space.of(names, method, (), search_params)
    prompts = [p for p in prompts if p.strip()]
    if spec == "style" and not prompts:
        chosen = random.Random(settings.seed).sample(style_prompts(), count)
        prompts, scorer.categories = [c["prompt"] for c in chosen], [c["category"] for c in chosen]
    batch = [settings.model_copy(update={"prompt": p}) for p in prompts or [settings.prompt]]
    return scorer, space, batch


def with_groups(space: Space, studio) -> Space:
    """The space with each shard's block groups searched too (the family's groups)."""
    if studio.blocks is None:
        raise ValueError("block groups: this denoiser has no block map")
    return Space(space.shards, space.method, tuple(studio.blocks.groups), space.params)
