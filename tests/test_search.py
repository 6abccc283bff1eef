"""Finding the soup (issue 34): the scorer search (CLI, tiny models of every family), the preference
search with a simulated person, and bad input named in one line."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from soup_ui.cli import main
from soup_ui.search.preference import PreferenceSearch, simulated_pick
from soup_ui.search.space import Space

SCORERS = Path(__file__).parent / "scorers"
TINY = ["--steps", "3", "--height", "16", "--width", "16", "--prompt", "a cat face"]


@pytest.fixture(autouse=True)
def user_scorers(monkeypatch):
    monkeypatch.syspath_prepend(str(SCORERS))
    sys.modules.pop("brightness", None)


def brightness(path: Path) -> float:
    return float(np.asarray(Image.open(path).convert("L")).mean()) / 255


def test_a_search_returns_a_recipe_that_renders_its_logged_best_score_and_the_same_seed_the_same_result(tiny_preset, tmp_path):
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run / "found.yaml"
        out.parent.mkdir()
        assert main(["search", "--preset", str(tiny_preset), "--shards", "alpha,beta,gamma", "--scorer", "python:brightness:score",
                     "--budget", "6", "--seed", "3", "--out", str(out), *TINY]) == 0
        runs.append(out)
    a, b = runs
    assert a.read_text() == b.read_text()  # same seed, same result
    assert a.with_suffix(".csv").read_text() == b.with_suffix(".csv").read_text()
    rows = list(csv.DictReader(a.with_suffix(".csv").open()))
    assert len(rows) == 6 and rows[0]["label"] == "soup: 0.34 alpha + 0.33 beta + 0.33 gamma"  # the plain soup first
    best = max(rows, key=lambda r: float(r["score"]))
    recipe = yaml.safe_load(a.read_text())
    assert recipe["search"].startswith("found by a search of the weights of alpha, beta, gamma: score ")
    assert float(best["score"]) >= float(rows[0]["score"])
    # The recipe renders the logged best score again.
    again = tmp_path / "again"
    assert main(["render", "--recipe", str(a), "--out-dir", str(again)]) == 0
    assert brightness(again / "soup.png") == pytest.approx(float(best["score"]), abs=1e-6)
    assert Image.open(a.with_suffix(".png")).width > 16  # the sheet of the best candidates


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_search_over_block_groups_runs_on_every_family(family, tmp_path):
    from tiny import make_family_preset, make_sdxl_preset

    preset = make_sdxl_preset(tmp_path) if family == "sdxl" else make_family_preset(tmp_path, family)
    shards = "ink,pastel"
    out = tmp_path / "found.yaml"
    assert main(["search", "--preset", str(preset), "--shards", shards, "--scorer", "python:brightness:score", "--block-groups",
                 "--budget", "5", "--seed", "1", "--out", str(out), "--log", str(tmp_path / "log.json"), *TINY]) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["searched"].startswith("the weights of ink, pastel; each one's ") and len(log["candidates"]) == 5
    assert any(c["blocks"] for c in log["candidates"][1:])  # block-group weights were searched
    assert main(["render", "--recipe", str(out), "--out-dir", str(tmp_path / "r")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--scorer", "style", "--target", "twemoji=0.5,pixel=0.5"], "error: target style 'pixel': the style judge knows fluent-color"),
    (["--scorer", "style", "--target", "twemoji=0.5,openmoji=0.6"], "error: target shares sum to 1.1, not 1"),
    (["--scorer", "style"], "error: scorer style: give the target shares of styles"),
    (["--scorer", "python:brightness:score", "--budget", "0"], "error: --budget must be at least 1 candidate, got 0"),
    (["--scorer", "python:brightness:score", "--shards", "alpha,zeta"], "error: --shards: unknown shard 'zeta' (the preset has: alpha, beta, gamma)"),
    (["--scorer", "reference", "--reference", "README.md"], "error: reference README.md: not an image"),
    (["--scorer", "python:nowhere:score"], "error: scorer python:nowhere:score: No module named 'nowhere'"),
])
def test_bad_search_input_is_named_before_any_model_loads(tiny_preset, tmp_path, capsys, args, message):
    argv = ["search", "--preset", str(tiny_preset), "--out", str(tmp_path / "f.yaml"), *TINY, *args]
    if "--shards" not in args:
        argv += ["--shards", "alpha,beta"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "f.yaml").exists()


def test_a_scorer_that_raises_stops_the_search_which_keeps_what_it_found(tiny_preset, tmp_path, caplog):
    out = tmp_path / "found.yaml"
    assert main(["search", "--preset", str(tiny_preset), "--shards", "alpha,beta", "--scorer", "python:brightness:flaky", "--strategy", "random",
                 "--budget", "12", "--out", str(out), *TINY]) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 5  # the plain soup and one round of 4; the next round's scorer call raised
    assert "the search stopped early (scorer python:brightness:flaky failed: RuntimeError: the scorer's service is down)" in caplog.text
    assert yaml.safe_load(out.read_text())["mix"]


def test_a_scorer_that_fails_at_once_is_one_line_and_writes_nothing(tiny_preset, tmp_path, capsys):
    out = tmp_path / "found.yaml"
    assert main(["search", "--preset", str(tiny_preset), "--shards", "alpha,beta", "--scorer", "python:brightness:broken", "--budget", "4",
                 "--out", str(out), *TINY]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the search found nothing: scorer python:brightness:broken failed: RuntimeError: no GPU here")
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_the_simulated_person_leads_the_preference_search_to_a_hidden_target_within_8_rounds():
    """The pairwise GP's rounds, picked by a person who prefers mixes near a hidden target (10% of
    picks flipped at random), come within 0.1 of it (total variation) within 8 rounds of 4."""
    target = {"a": 0.6, "b": 0.0, "c": 0.4}
    for seed in (0, 1):
        search = PreferenceSearch(Space.of(["a", "b", "c"]), seed=seed)
        rng = np.random.default_rng(seed)

        def distance(i):
            w = search.candidate(i).weights
            return 0.5 * sum(abs(w[k] - target[k]) for k in target)

        rounds = 0
        while rounds < 8 and (search.best is None or distance(search.best) > 0.1):
            search.propose()
            search.pick(simulated_pick(search, distance, rng))
            rounds += 1
        assert distance(search.best) <= 0.1, (seed, rounds, search.candidate(search.best))


def test_a_preference_search_undoes_its_last_pick_and_survives_as_plain_data():
    search = PreferenceSearch(Space.of(["a", "b"]), seed=2)
    first = search.propose()
    assert len(first.shown) == 4 and search.candidate(first.shown[0]).label() == "0.50 a + 0.50 b"  # the plain soup first
    search.pick(first.shown[2])
    second = search.propose()
    assert second.shown[0] == first.shown[2] and len(second.shown) == 4  # the best so far stays in the round
    comparisons, points = list(search.comparisons), len(search.points)
    search.none_better()
    assert len(search.comparisons) == len(comparisons) + 3 and search.best == first.shown[2]
    search.undo()
    assert search.comparisons == comparisons and not search.current.answered
    search.pick(second.shown[1])
    restored = PreferenceSearch.from_state(json.loads(json.dumps(search.state())))
    assert restored.state() == search.state() and restored.best == second.shown[1]
    search.propose()
    search.undo()  # the open round goes, and the pick before it is taken back
    assert len(search.points) == points and search.best == first.shown[2] and not search.current.answered
    with pytest.raises(ValueError, match="pick one of the candidates of the current round"):
        search.pick(999)


def test_a_simulated_person_reaches_the_scorer_search_on_the_embedded_default_within_8_rounds():
    """The bench's check, once: on the embedded default, CMA-ES (16 candidates) beats the plain 50/50
    soup's distance to a twemoji/openmoji target, and a simulated person (picks the candidate nearest
    the hidden target by the style judge, 10% of picks flipped) gets as near within 8 rounds of 4."""
    import importlib.util

    from soup_ui.engine.studio import Studio
    from soup_ui.modelfiles.presets import load_preset

    spec = importlib.util.spec_from_file_location("search_bench", Path(__file__).resolve().parents[1] / "bench" / "search_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    studio = Studio(load_preset(Path(__file__).resolve().parents[1] / "presets" / "emoji-styles.yaml"))
    target = {"twemoji": 0.5, "openmoji": 0.5}
    found, _ = bench.scorer_run(studio, target, seed=2, budget=16, strategy="cmaes")
    assert found.best.details["distance"] < found.tried[0].details["distance"]  # better than the plain soup
    goal = -found.best.score  # CMA-ES's distance (the score is minus it; content kept at the plain soup's)
    rounds, reached = bench.preference_run(studio, target, seed=2, goal=goal, rounds=8)
    assert rounds <= 8 and reached <= goal, (rounds, reached, goal)
