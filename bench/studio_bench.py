"""Slider to picture, and memory, on the embedded emoji default.

    python bench/studio_bench.py [--preset presets/emoji-styles.yaml] [--repeats 5]

- First render: every component plus the soup, cold cache.
- Slider to picture: a weight change -> the new soup image (components come from the cache),
  against what a naive app does: render every component and the soup again.
- Memory: RSS with N shards loaded against N+1 UNets plus the shared parts (text encoder, VAE),
  and RSS after 200 mixes against after 1 (must not grow).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from soup_ui.cli import quiet_libraries  # noqa: E402
from soup_ui.modelfiles.presets import RenderSettings, load_preset  # noqa: E402
from soup_ui.engine.studio import Studio  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def module_mb(module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "emoji-styles.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--methods", default="ties", help="also time a slider release with these merge methods, interleaved with the average")
    parser.add_argument("--blocks", action="store_true", help="also time a slider release with block weights (random per shard and block)")
    args = parser.parse_args(argv)
    quiet_libraries()
    start_rss = rss_mb()
    studio = Studio(load_preset(args.preset))
    loaded_rss = rss_mb()
    names = list(studio.shards)
    r = studio.preset.render
    settings = RenderSettings(**{**r.model_dump(exclude={"prompts"}), "prompt": r.prompts[0] if r.prompts else r.prompt})
    rng = random.Random(0)

    def random_mix():
        return {n: rng.uniform(0.05, 1.0) for n in names}

    t0 = time.perf_counter()
    studio.render(studio.make_mix(random_mix()), settings)
    first = time.perf_counter() - t0

    slider = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        studio.render(studio.make_mix(random_mix()), settings)
        slider.append(time.perf_counter() - t0)
    methods = [m for m in args.methods.split(",") if m] + (["block weights"] if args.blocks else [])

    def mix_of(method: str):
        if method == "block weights":  # the average, every shard with its own random block vector
            return studio.make_mix(random_mix(), blocks={n: [rng.uniform(0, 1) for _ in studio.blocks.ids] for n in names})
        return studio.make_mix(random_mix(), method)

    by_method = {m: [] for m in ["average", *methods]}
    for method in by_method:  # first use of each (compiled kernels, if any, compile here), untimed
        studio.render(mix_of(method), settings)
    for _ in range(args.repeats):
        for method, times in by_method.items():
            mix = mix_of(method)
            t0 = time.perf_counter()
            studio.render(mix, settings)
            times.append(time.perf_counter() - t0)
    naive = []
    for _ in range(args.repeats):
        studio.renderer.images.clear()  # a naive app keeps no cache: every image again
        t0 = time.perf_counter()
        studio.render(studio.make_mix(random_mix()), settings)
        naive.append(time.perf_counter() - t0)

    mixes_rss = []
    for i in range(200):
        studio.mix(studio.make_mix(random_mix()))
        if i in (0, 199):
            mixes_rss.append(rss_mb())
    unet = module_mb(studio.hybrid)
    shared = module_mb(studio.pipe.text_encoder) + module_mb(studio.pipe.vae)
    expected = (len(names) + 1) * unet + shared
    s, n = statistics.median(slider), statistics.median(naive)
    lines = [
        f"Machine: {machine()}",
        f"Preset {args.preset.name}: {len(names)} shards, {settings.steps} steps {settings.scheduler}, "
        f"guidance {settings.guidance_scale}, {settings.width}x{settings.height}; medians of {args.repeats}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| first render, {len(names)} components + soup (cold) | {first:.2f} s |",
        f"| slider to picture: new weights -> new soup (components cached) | {s:.2f} s |",
        f"| naive: every component and the soup again | {n:.2f} s |",
        f"| naive / ours | {n / s:.1f}x |",
        *[f"| slider to picture with {m}{'' if m == 'block weights' else ' (its default parameters)'} | {statistics.median(t):.2f} s, "
          f"{statistics.median(t) / statistics.median(by_method['average']):.2f}x the average's ({statistics.median(by_method['average']):.2f} s) |"
          for m, t in by_method.items() if m != "average"],
        f"| RSS growth from loading the preset | {loaded_rss - start_rss:.0f} MB |",
        f"| N+1 UNets + text encoder + VAE, as tensors | {expected:.0f} MB |",
        f"| RSS after 1 mix / after 200 mixes | {mixes_rss[0]:.0f} MB / {mixes_rss[1]:.0f} MB |",
    ]
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
