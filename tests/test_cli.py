"""`python -m soup_ui render|export`: files written, and one-line errors for bad arguments."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from soup_ui.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_render_writes_strip_and_one_png_per_image(tiny_preset, tmp_path, studio):
    rc = main([
        "render", "--preset", str(tiny_preset), "--mix", "alpha=0.5,beta=0.5", "--prompt", "a cat face",
        "--seed", "3", "--out", str(tmp_path / "strip.png"), "--out-dir", str(tmp_path / "each"),
    ])
    assert rc == 0
    strip = Image.open(tmp_path / "strip.png")
    assert strip.width > 3 * 160 and strip.height > 160
    files = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert files == ["alpha.png", "beta.png", "soup.png"]
    # The same images the library renders for the same settings.
    from soup_ui.presets import RenderSettings

    settings = RenderSettings(prompt="a cat face", seed=3, steps=3, guidance_scale=4.0, height=16, width=16)
    expected = studio.render_soup({"alpha": 0.5, "beta": 0.5}, settings).image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "each" / "soup.png")), np.asarray(expected))


def test_export_writes_the_soup_with_its_recipe(tiny_preset, tmp_path):
    out = tmp_path / "soup.safetensors"
    assert main(["export", "--preset", str(tiny_preset), "--mix", "beta=1,gamma=1", "--out", str(out)]) == 0
    exported = load_file(str(out))
    beta = load_file(str(tiny_preset.parent / "beta.safetensors"))
    gamma = load_file(str(tiny_preset.parent / "gamma.safetensors"))
    for k in beta:
        torch.testing.assert_close(exported[k], (beta[k] + gamma[k]) / 2, rtol=0, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["soup_ui.recipe"])
    assert [(s["name"], s["weight"]) for s in recipe["shards"]] == [("beta", 0.5), ("gamma", 0.5)]
    # An existing file is not overwritten without --overwrite.
    before = out.read_bytes()
    assert main(["export", "--preset", str(tiny_preset), "--mix", "beta=1", "--out", str(out)]) == 2
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mix", "alpha=heavy"], "error: --mix: weight of 'alpha' is not a number: 'heavy'"),
        (["--mix", "zeta=1"], "error: unknown shard 'zeta' (loaded: alpha, beta, gamma)"),
        (["--mix", "alpha=0,beta=0"], "error: the weights sum to zero"),
        (["--steps", "0"], "error: options: steps: Input should be greater than or equal to 1 (got 0)"),
        (["--height", "20"], "error: options: height: must be divisible by 8 but is 20"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_preset, tmp_path, capsys, args, message):
    rc = main(["render", "--preset", str(tiny_preset), "--out", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(message)
    assert not (tmp_path / "x.png").exists()


def test_a_missing_preset_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "soup_ui", "render", "--preset", str(tmp_path / "none.yaml"), "--out", "x.png"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'none.yaml'}: no such file"
