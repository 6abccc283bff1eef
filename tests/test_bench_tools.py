"""The benchmark helpers that make the README's figures (bench/curves.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import curves  # noqa: E402


def write_run(path: Path, label: str, points: list[tuple[str, int, float, float]]) -> Path:
    path.write_text(json.dumps({"label": label, "points": [
        {"style": s, "steps": n, "own_style": o, "category_top1": c} for s, n, o, c in points]}))
    return path


def test_curves_series_sorted_in_percent(tmp_path):
    run = curves.load_runs([write_run(tmp_path / "a.json", "a", [("twemoji", 300, 0.3, 0.5), ("twemoji", 100, 0.2, 0.4), ("noto", 100, 0.5, 0.6)])])[0]
    assert curves.series(run, "own_style") == {"noto": ([100], [50.0]), "twemoji": ([100, 300], [20.0, 30.0])}
    assert curves.series(run, "category_top1")["twemoji"] == ([100, 300], [40.0, 50.0])


def test_curves_refuses_a_file_without_points(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"label": "x", "points": []}))
    with pytest.raises(ValueError, match="empty.json: no points"):
        curves.load_runs([empty])


def test_curves_plot_draws_each_style_in_its_colour(tmp_path):
    runs = curves.load_runs([write_run(tmp_path / "a.json", "a", [("twemoji", 100, 0.2, 0.4), ("twemoji", 600, 0.3, 0.6),
                                                                  ("fluent-hc", 100, 0.6, 0.4), ("fluent-hc", 600, 0.9, 0.5)])])
    out = tmp_path / "fig" / "curves.png"
    curves.plot(runs, out)
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)

    def count(hex_colour: str) -> int:
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - rgb).sum(1) < 30).sum())

    assert count(curves.STYLE_COLOURS["twemoji"]) > 100  # its lines, markers and legend entry
    assert count(curves.STYLE_COLOURS["noto"]) == 0  # not in these runs


def test_memorize_probe_links_one_style_of_the_chosen_emoji(tmp_path):
    import memorize_probe

    data = tmp_path / "data"
    rows = [{"file_name": f"{style}/{e}.png", "emoji_id": e, "style": style, "text_ascii": e}
            for e in ("1f600", "1f601", "1f602") for style in ("twemoji", "noto")]
    for r in rows:
        (data / r["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), "white").save(data / r["file_name"])
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "subset"
    keep = memorize_probe.subset_folder(data, out, "twemoji", {"1f600", "1f602"})
    assert [r["file_name"] for r in keep] == ["twemoji/1f600.png", "twemoji/1f602.png"]
    assert (out / "twemoji" / "1f600.png").is_symlink() and not (out / "twemoji" / "1f601.png").exists()
    assert [json.loads(line)["emoji_id"] for line in (out / "metadata.jsonl").read_text().splitlines()] == ["1f600", "1f602"]
