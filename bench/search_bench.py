"""Find the soup, measured on the embedded default (issue 34): for 3 shard pairs at 50/50 and one
3-shard target, 3 seeds each, medians:

- the plain soup (equal weights), random search and CMA-ES at the same budget: the total-variation
  distance of the found mix's style shares (the shipped style judge) to the target, and whether a
  pair soup reads as both parents (each at least 0.25);
- the preference search with a simulated person (prefers the candidate whose style shares are
  closest to a hidden target; 10% of picks flipped at random): rounds of 4 until the best so far is
  within CMA-ES's final distance (at most --rounds);
- wall time per candidate in-process (and with --workers N, through N Ray Serve replicas).

    python bench/search_bench.py --budget 16 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from soup_ui.cli import quiet_libraries  # noqa: E402
from soup_ui.engine.studio import Studio  # noqa: E402
from soup_ui.modelfiles.presets import load_preset  # noqa: E402
from soup_ui.search.preference import PreferenceSearch, simulated_pick  # noqa: E402
from soup_ui.search.run import mix_of, render_all, search, setup  # noqa: E402

logger = logging.getLogger("search_bench")
TARGETS = [
    {"twemoji": 0.5, "openmoji": 0.5},
    {"fluent-hc": 0.5, "noto": 0.5},
    {"fluent-color": 0.5, "openmoji": 0.5},
    {"twemoji": 1 / 3, "openmoji": 1 / 3, "noto": 1 / 3},
]


def target_text(target: dict) -> str:
    return ",".join(f"{k}={v:.6f}" for k, v in target.items())


def scorer_run(studio, target: dict, seed: int, budget: int, strategy: str):
    settings = studio.preset.render.model_copy(update={"seed": seed})
    scorer, space, batch = setup("style", list(target), settings, target=target_text(target))
    found = search(studio, space, scorer, batch, budget=budget, seed=seed, strategy=strategy, progress=lambda f, d: logger.info("%s: %s", strategy, d))
    return found, scorer


def preference_run(studio, target: dict, seed: int, goal: float, rounds: int) -> tuple[int, float]:
    """Rounds of 4 until the simulated person's best is within `goal` of the hidden target."""
    settings = studio.preset.render.model_copy(update={"seed": seed})
    scorer, space, batch = setup("style", list(target), settings, target=target_text(target))
    scorer.categories = None
    found = PreferenceSearch(space, seed=seed)
    rng = np.random.default_rng(seed)
    distances: dict[int, float] = {}

    def distance(i: int) -> float:
        if i not in distances:
            mix = mix_of(studio, space, found.candidate(i))
            distances[i] = scorer.distance(scorer.shares(render_all(studio, [mix], batch)[0]))
        return distances[i]

    for r in range(1, rounds + 1):
        found.propose()
        found.pick(simulated_pick(found, distance, rng))
        if distance(found.best) <= goal:
            return r, distance(found.best)
    return rounds + 1, distance(found.best)  # not reached


def replicas_round(preset: str, replicas: int, repeats: int = 3) -> float:
    """Median seconds for a round of 4 candidates (4 held-out names each) through `replicas` Ray Serve
    replicas of one CPU each (the page's path with --workers)."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from soup_ui.engine.runtime import RuntimeOptions
    from soup_ui.serving import workers as W

    workers = W.Workers.start([Path(preset)], RuntimeOptions(), W.WorkerOptions(replicas=replicas, cpus=1))
    try:
        routed = W.RoutedStudio(load_preset(preset), W.Workers.PAGE_OPTIONS, None, workers)
        settings = routed.preset.render
        _, space, batch = setup("style", ["twemoji", "openmoji"], settings, target="twemoji=0.5,openmoji=0.5")
        rng = np.random.default_rng(0)
        times = []
        for _ in range(repeats + 1):  # the first round warms the replicas up
            mixes = [mix_of(routed, space, space.decode(rng.uniform(0, 1, space.dims))) for _ in range(4)]
            t0 = time.monotonic()
            render_all(routed, mixes, batch)
            times.append(time.monotonic() - t0)
        return statistics.median(times[1:])
    finally:
        workers.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(ROOT / "presets" / "emoji-styles.yaml"))
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--targets", type=int, default=len(TARGETS), help="how many of the targets (the first N)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--workers", action="store_true", help="only: a round of 4 candidates through 1 and 2 Ray Serve replicas")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_libraries()
    if args.workers:
        one, two = replicas_round(args.preset, 1), replicas_round(args.preset, 2)
        print(f"\nmachine: {machine()}\na round of 4 candidates (4 images each): 1 replica {one:.1f} s, 2 replicas {two:.1f} s median; "
              f"2 replicas take {two / one:.2f}x the time of 1")
        return
    studio = Studio(load_preset(args.preset))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for target in TARGETS[: args.targets]:
        for seed in seeds:
            t0 = time.monotonic()
            cma, scorer = scorer_run(studio, target, seed, args.budget, "cmaes")
            per_candidate = (time.monotonic() - t0) / len(cma.tried)
            rnd, _ = scorer_run(studio, target, seed, args.budget, "random")
            plain = cma.tried[0]
            rounds, reached = preference_run(studio, target, seed, -cma.best.score, args.rounds)
            row = {
                "target": target_text(target), "seed": seed, "plain": plain.details["distance"], "random": -rnd.best.score,
                "cmaes": cma.best.details["distance"], "cmaes_mix": cma.best.candidate.weights, "cmaes_shares": cma.best.details["shares"],
                "plain_shares": plain.details["shares"], "rounds": rounds, "preference": reached, "seconds_per_candidate": per_candidate,
            }
            row["plain_both"] = len(target) == 2 and all(plain.details["shares"].get(s, 0) >= 0.25 for s in target)
            row["cmaes_both"] = len(target) == 2 and all(cma.best.details["shares"].get(s, 0) >= 0.25 for s in target)
            logger.info("%s", json.dumps(row))
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nmachine: {machine()}; budget {args.budget} candidates, seeds {args.seeds}; medians over seeds\n")
    print("| target | plain | random | CMA-ES | both parents >= 0.25 (plain -> CMA-ES) | preference rounds to CMA-ES's distance |")
    print("|---|---|---|---|---|---|")
    for target in TARGETS[: args.targets]:
        rows = [r for r in results if r["target"] == target_text(target)]
        med = {k: statistics.median(r[k] for r in rows) for k in ("plain", "random", "cmaes", "rounds")}
        both = f"{sum(r['plain_both'] for r in rows)}/{len(rows)} -> {sum(r['cmaes_both'] for r in rows)}/{len(rows)}" if len(target) == 2 else "-"
        name = " + ".join(f"{k} {v:.2f}" for k, v in target.items())
        print(f"| {name} | {med['plain']:.3f} | {med['random']:.3f} | {med['cmaes']:.3f} | {both} | {med['rounds']:g} |")
    per = statistics.median(r["seconds_per_candidate"] for r in results)
    print(f"\nwall time per candidate (4 images, in-process): {per:.2f} s median; {60 / per:.0f} candidates per minute")


if __name__ == "__main__":
    main()
