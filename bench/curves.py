"""Plot learning curves of the emoji shards: own-style rate and category top-1 against shard steps.

    python bench/curves.py bench/curves/*.json --out assets/readme/shard-curves.png

Each JSON file is one run, written by `python bench/emoji_eval.py --curves WORK --curves-json F
--label "..."` (or transcribed from an earlier table, which its "source" field says). Colour is the
style, line style the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE_COLOURS = {
    "fluent-color": "#e07b00",
    "fluent-flat": "#c9a400",
    "fluent-hc": "#222222",
    "twemoji": "#1d9bf0",
    "noto": "#2e9e44",
    "openmoji": "#b4308f",
}
DASHES = ["-", "--", ":", "-."]


def load_runs(files: list[Path]) -> list[dict]:
    """The runs, each with its label and points sorted by (style, steps); refuses a file without points."""
    runs = []
    for file in files:
        run = json.loads(file.read_text())
        if not run.get("points"):
            raise ValueError(f"{file}: no points (expected emoji_eval.py --curves-json output)")
        run["points"] = sorted(run["points"], key=lambda p: (p["style"], p["steps"]))
        runs.append(run)
    return runs


def series(run: dict, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """style -> (steps, values in percent) for one run."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for p in run["points"]:
        steps, values = out.setdefault(p["style"], ([], []))
        steps.append(p["steps"])
        values.append(100 * p[metric])
    return out


def plot(runs: list[dict], out: Path, target: float = 80.0) -> None:
    """Two panels (own style, category top-1) against shard steps; the own-style and category targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = (("own_style", "own style (% of images)", target), ("category_top1", "category top-1 (%)", 50.0))
    for ax, (metric, title, goal) in zip(axes, panels):
        for i, run in enumerate(runs):
            for style, (steps, values) in series(run, metric).items():
                ax.plot(steps, values, DASHES[i % len(DASHES)], marker="o", ms=3, color=STYLE_COLOURS.get(style, "grey"),
                        label=f"{style} ({run['label']})")
        ax.axhline(goal, color="red", lw=0.8, ls=(0, (4, 4)))
        ax.set_title(title)
        ax.set_xlabel("shard steps (batch 32)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right", ncol=1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="emoji_eval.py --curves-json files")
    parser.add_argument("--out", type=Path, default=Path("assets/readme/shard-curves.png"))
    args = parser.parse_args(argv)
    plot(load_runs(args.runs), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
