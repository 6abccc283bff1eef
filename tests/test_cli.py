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
from safetensors.torch import load_file, save_file

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
    from soup_ui.modelfiles.presets import RenderSettings

    settings = RenderSettings(prompt="a cat face", seed=3, steps=3, guidance_scale=4.0, height=16, width=16)
    expected = studio.render_soup(studio.make_mix({"alpha": 0.5, "beta": 0.5}), settings).image
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


def test_recipe_round_trip_renders_the_same_images(tiny_preset, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    recipe = tmp_path / "recipes" / "r.yaml"
    assert main([
        "render", "--preset", str(tiny_preset), "--mix", "alpha=0.2,gamma=0.8", "--mode", "task-arithmetic", "--scale", "1.5",
        "--prompt", "a dog", "--seed", "9", "--out-dir", str(first), "--save-recipe", str(recipe),
    ]) == 0
    assert main(["render", "--recipe", str(recipe), "--out-dir", str(second)]) == 0
    for name in ("alpha.png", "gamma.png", "soup.png"):
        assert np.array_equal(np.asarray(Image.open(first / name)), np.asarray(Image.open(second / name)))
    # The recipe is not overwritten without --overwrite.
    before = recipe.read_text()
    assert main(["render", "--recipe", str(recipe), "--mix", "beta=1", "--out-dir", str(second), "--save-recipe", str(recipe)]) == 2
    assert recipe.read_text() == before


def test_workflow_commands_write_their_pictures(tiny_preset, tmp_path, capsys):
    assert main(["leave-one-out", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1,gamma=1", "--out", str(tmp_path / "loo.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["without alpha", "without beta", "without gamma"]
    assert main(["interpolate", "--preset", str(tiny_preset), "--from", "alpha", "--to", "beta", "--count", "4", "--out", str(tmp_path / "i.png")]) == 0
    assert main(["grid", "--preset", str(tiny_preset), "--x", "seed=0,1,2", "--y", "weight:beta=0,1", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "loo.png").width > 4 * 160
    assert Image.open(tmp_path / "i.png").width > 4 * 160
    grid = Image.open(tmp_path / "g.png")
    assert grid.width > 3 * 96 and grid.height > 2 * 96
    assert main(["grid", "--preset", str(tiny_preset), "--x", "colour=1", "--y", "seed=1", "--out", str(tmp_path / "x.png")]) == 2


def test_export_pipeline_loads_with_plain_diffusers(tiny_preset, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "pipe"
    assert main(["export", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=3", "--format", "pipeline", "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    alpha = load_file(str(tiny_preset.parent / "alpha" / "diffusion_pytorch_model.safetensors"))
    beta = load_file(str(tiny_preset.parent / "beta.safetensors"))
    unet = pipe.unet.state_dict()
    for k in ("conv_in.weight", "conv_out.weight"):
        torch.testing.assert_close(unet[k], 0.25 * alpha[k] + 0.75 * beta[k], rtol=0, atol=1e-6)
    assert main(["export", "--preset", str(tiny_preset), "--mix", "alpha=1", "--format", "pipeline", "--out", str(out)]) == 2


def test_add_shard_validates_and_writes_a_new_preset(tiny_preset, tmp_path):
    from soup_ui.modelfiles.presets import load_preset

    out = tmp_path / "extended.yaml"
    shard = tiny_preset.parent / "gamma.safetensors"
    assert main(["add-shard", "--preset", str(tiny_preset), "--name", "delta", "--path", str(shard), "--out", str(out)]) == 0
    assert [s.name for s in load_preset(out).shards] == ["alpha", "beta", "gamma", "delta"]
    assert main(["add-shard", "--preset", str(tiny_preset), "--name", "delta", "--path", str(shard), "--out", str(out)]) == 2  # exists
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(1)}, str(bad))
    assert main(["add-shard", "--preset", str(tiny_preset), "--name", "bad", "--path", str(bad), "--out", str(tmp_path / "b.yaml")]) == 2
    assert not (tmp_path / "b.yaml").exists()


@pytest.fixture(scope="module")
def strips(tiny_preset, tmp_path_factory):
    """The soup for one mix under several options, rendered through the CLI."""
    folder = tmp_path_factory.mktemp("options")

    def soup(*options) -> np.ndarray:
        out = folder / ("-".join(o.strip("-") for o in options) or "plain")
        assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,gamma=1", "--seed", "4", "--out-dir", str(out), *options]) == 0
        return np.asarray(Image.open(out / "soup.png"), dtype=np.int16)

    return soup


@pytest.mark.parametrize("scheduler", ["euler", "euler-a", "ddim", "unipc", "pndm"])
def test_every_scheduler_renders_its_own_image(strips, scheduler):
    plain, other = strips("--steps", "4"), strips("--scheduler", scheduler, "--steps", "4")
    assert other.shape == plain.shape and np.abs(other - plain).max() > 0


def test_too_few_steps_for_a_scheduler_is_one_line(tiny_preset, capsys):
    assert main(["render", "--preset", str(tiny_preset), "--scheduler", "pndm", "--steps", "3", "--out", "x.png"]) == 2
    assert "the pndm scheduler needs at least 4 steps, got 3" in capsys.readouterr().err


def test_a_negative_prompt_changes_the_image(strips):
    assert np.abs(strips("--negative-prompt", "a blue car") - strips()).max() > 0


def test_float16_renders_close_to_float32(strips):
    half, full = strips("--dtype", "float16"), strips()
    assert np.abs(half - full).mean() < 8  # the same picture, up to half-precision rounding


def test_task_arithmetic_in_lean_mode_equals_in_memory(tiny_preset, tmp_path):
    args = ["export", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=3", "--mode", "task-arithmetic", "--scale", "1.7"]
    assert main([*args, "--out", str(tmp_path / "mem.safetensors")]) == 0
    assert main([*args, "--lean", "--out", str(tmp_path / "lean.safetensors")]) == 0
    mem, lean = load_file(str(tmp_path / "mem.safetensors")), load_file(str(tmp_path / "lean.safetensors"))
    assert all(torch.equal(mem[k], lean[k]) for k in mem)


def readme_commands() -> list[str]:
    """Every `python -m soup_ui ...` command of the README and docs/, in reading order, joined over
    line continuations."""
    import re

    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`(python -m soup_ui [^`]+)`", text)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = " ".join(command.split())
            if command.startswith("python -m soup_ui ") and command not in commands:
                commands.append(command)
    return commands


def test_the_readme_has_runnable_commands():
    names = {c.split()[3] for c in readme_commands()}
    assert {"render", "export", "leave-one-out", "interpolate", "grid", "add-shard", "train"} <= names


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory):
    """The repository's layout in a scratch folder (the README's commands write their outputs there, in order)."""
    top = tmp_path_factory.mktemp("readme")
    root = top / "repo"
    root.mkdir()
    for name in ("presets", "assets", "soup_ui"):
        (root / name).symlink_to(ROOT / name)
    if (ROOT.parent / "shared").exists():
        (top / "shared").symlink_to(ROOT.parent / "shared")
    return root


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_runs_as_printed(command, scratch_repo, monkeypatch, capsys):
    """Issue 12, item 11: each command of the README and docs/ runs on the embedded default, in the
    order printed, from the repository's layout (`train` runs 2 steps instead of its 400). In-process
    through `main(argv)`, as `python -m soup_ui` calls it (a subprocess would add a torch import
    each; `test_a_missing_preset_is_one_line_without_traceback` runs the module itself)."""
    import shlex

    from soup_ui.maths import soup

    argv = shlex.split(command, comments=True)[3:]
    if argv[0] == "train":
        argv += ["--steps", "2"]
    monkeypatch.chdir(scratch_repo)
    monkeypatch.setattr(soup, "BACKGROUND", False)  # as __main__ sets it: one command, no compile ahead
    assert main(argv) == 0, capsys.readouterr().err[-3000:]


def test_add_shard_and_render_take_a_single_file_and_a_lora(tiny_preset, tmp_path, studio, capsys):
    """The CLI reads what users own: the A1111-style file renders exactly as its diffusers twin;
    a LyCORIS file is refused in one line naming it (exit 2)."""
    from test_formats import save_kohya_lora, to_ldm

    weights = {k: v.clone() for k, v in studio.shards["gamma"].tensors.items()}
    save_file(to_ldm(weights, studio.hybrid.config), str(tmp_path / "single.safetensors"))
    save_kohya_lora(studio, tmp_path / "lora.safetensors", seed=5)
    preset = tiny_preset
    for name in ("single", "lora"):
        out = tmp_path / f"with-{name}.yaml"
        assert main(["add-shard", "--preset", str(preset), "--name", name, "--path", str(tmp_path / f"{name}.safetensors"), "--out", str(out)]) == 0
        preset = out
    args = ["--prompt", "a cat face", "--seed", "2"]
    assert main(["render", "--preset", str(preset), "--mix", "single=1,lora=1", *args, "--out-dir", str(tmp_path / "a"), "--out", str(tmp_path / "a.png")]) == 0
    assert main(["render", "--preset", str(preset), "--mix", "gamma=1,lora=1", *args, "--out-dir", str(tmp_path / "b"), "--out", str(tmp_path / "b.png")]) == 0
    same = [np.asarray(Image.open(tmp_path / d / "soup.png")) for d in ("a", "b")]
    assert np.array_equal(*same)
    save_file({"lora_unet_x.lokr_w1": torch.ones(2, 2)}, str(tmp_path / "lokr.safetensors"))
    capsys.readouterr()
    assert main(["add-shard", "--preset", str(tiny_preset), "--name", "k", "--path", str(tmp_path / "lokr.safetensors"), "--out", str(tmp_path / "k.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a LyCORIS LoKr network (lokr_w1 tensors)" in err and len(err.splitlines()) == 1


def test_export_single_file_writes_an_ldm_checkpoint(tiny_preset, tmp_path):
    out = tmp_path / "soup-single.safetensors"
    assert main(["export", "--preset", str(tiny_preset), "--mix", "beta=1,gamma=1", "--format", "single-file", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        names = list(f.keys())
        assert json.loads(f.metadata()["soup_ui.recipe"])["shards"][0]["name"] == "beta"
    assert "model.diffusion_model.input_blocks.0.0.weight" in names and "first_stage_model.encoder.conv_in.weight" in names
    assert main(["export", "--preset", str(tiny_preset), "--mix", "beta=1", "--format", "single-file", "--out", str(tmp_path / "x.ckpt")]) == 2


EXIT_DURING_COMPILE = """
import runpy, sys, torch
from soup_ui.maths import soup
soup.warm_up([1, 2, 3], torch.float32, "cpu")  # kernel compiles in flight, as a server starts them
sys.argv = ["soup_ui", *sys.argv[1:]]
print("compiling", len(soup.compiling()), flush=True)
runpy.run_module("soup_ui", run_name="__main__")  # python -m soup_ui ..., which ends with soup.exit
"""


@pytest.mark.parametrize("count", [6, pytest.param(50, marks=pytest.mark.long)])
def test_a_cli_export_exiting_during_a_background_compile_never_aborts(tiny_preset, tmp_path, count):
    """A process that exits while a kernel compile runs in a background thread could abort at
    teardown ("terminate called without an active exception", exit 134) after writing its file;
    `python -m soup_ui` ends with soup.exit, which abandons the compile cleanly. `count` runs, 3 at a
    time (the 50-run version with `pytest --long`)."""
    script = tmp_path / "exit_during_compile.py"
    script.write_text(EXIT_DURING_COMPILE)
    runs, results = list(range(count)), []
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    while runs:
        batch, runs = runs[:3], runs[3:]
        procs = [subprocess.Popen([sys.executable, str(script), "export", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1",
                                   "--out", str(tmp_path / f"soup-{i}.safetensors")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in batch]
        results += [(i, p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for i, p in zip(batch, procs)]
    aborted = [(i, rc, err[-300:]) for i, rc, _, err in results if rc != 0 or "terminate called" in err]
    assert aborted == []
    assert all("compiling 3" in out for _, _, out, _ in results)  # each exited with compiles in flight
    expected = load_file(str(tmp_path / "soup-0.safetensors"))
    for i in range(count):
        written = load_file(str(tmp_path / f"soup-{i}.safetensors"))
        assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())


def test_images_carry_their_recipe_and_render_again_from_it_byte_for_byte(tiny_preset, tmp_path, capsys):
    """Every PNG the CLI writes carries A1111's `parameters` text and the full recipe; `--recipe
    image.png` restores the mix, method, parameters and settings: the same PNG, byte for byte."""
    first = tmp_path / "first"
    assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,gamma=3", "--method", "ties", "--param", "density=0.4",
                 "--prompt", "a cat face", "--negative-prompt", "blurry", "--seed", "5", "--out-dir", str(first), "--out", str(tmp_path / "strip.png")]) == 0
    soup = Image.open(first / "soup.png")
    lines = soup.text["parameters"].splitlines()
    assert lines[0] == "a cat face" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: ") and "Seed: 5, Size: 16x16" in lines[2]
    assert "Merge method: ties, Merge parameters: density=0.4" in lines[2]
    recipe = json.loads(soup.text["soup_ui.recipe"])
    assert (recipe["mix"], recipe["method"], recipe["params"]["density"]) == ({"alpha": 1.0, "gamma": 3.0}, "ties", 0.4)
    assert json.loads(Image.open(tmp_path / "strip.png").text["soup_ui.recipe"]) == recipe
    component = Image.open(first / "alpha.png").text
    assert json.loads(component["soup_ui.recipe"])["mix"] == {"alpha": 1.0} and "Model hash: " in component["parameters"]
    again = tmp_path / "again"
    assert main(["render", "--recipe", str(first / "soup.png"), "--out-dir", str(again)]) == 0
    assert (again / "soup.png").read_bytes() == (first / "soup.png").read_bytes()
    alone = tmp_path / "alone"
    assert main(["render", "--recipe", str(first / "alpha.png"), "--out-dir", str(alone)]) == 0
    assert (alone / "alpha.png").read_bytes() == (first / "alpha.png").read_bytes()
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    capsys.readouterr()
    assert main(["render", "--recipe", str(tmp_path / "plain.png"), "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "plain.png: this PNG carries no studio recipe" in err and len(err.splitlines()) == 1


def test_a_png_recipe_keeps_the_mix_order_and_renders_the_same_bytes(tiny_preset, tmp_path):
    """Issue 33, defect 1: the recipe a PNG carries lists the shards in mix order (a sorted order
    sums in another order, and the label reads the other way round); rendered again, the same bytes."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["render", "--preset", str(tiny_preset), "--mix", "gamma=0.7,alpha=0.3", "--prompt", "a cat face", "--seed", "4",
                 "--out-dir", str(first)]) == 0
    text = Image.open(first / "soup.png").text
    assert list(json.loads(text["soup_ui.recipe"])["mix"]) == ["gamma", "alpha"]
    assert "Soup: soup: 0.70 gamma + 0.30 alpha" in text["parameters"]
    assert main(["render", "--recipe", str(first / "soup.png"), "--out-dir", str(again)]) == 0
    assert (again / "soup.png").read_bytes() == (first / "soup.png").read_bytes()


def test_a_streamed_export_keeps_the_bases_half_precision_and_refuses_an_unknown_dtype(tmp_path, capsys):
    """Issue 33, defect 2: the fp16 embedded default exports fp16 (not float32, twice the size),
    and A1111's metadata says half; an unknown --dtype is refused, not read as float32."""
    out = tmp_path / "soup.safetensors"
    assert main(["export", "--mix", "twemoji=0.5,openmoji=0.5", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert json.loads(f.metadata()["sd_merge_recipe"])["save_as_half"] is True
    assert dtypes == {"F16"}
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--mix", "twemoji=1", "--dtype", "float8", "--out", str(tmp_path / "x.safetensors")])
    assert exit_.value.code == 2 and "--dtype: invalid choice: 'float8'" in capsys.readouterr().err
    assert main(["export", "--mix", "twemoji=1", "--dtype", "float32", "--out", str(tmp_path / "f32.safetensors")]) == 0
    with safe_open(str(tmp_path / "f32.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


@pytest.mark.parametrize("command", ["render", "export"])
def test_a_weight_out_of_range_is_refused_before_any_model_loads(tiny_preset, tmp_path, capsys, monkeypatch, command):
    """Issue 33, defect 3: a weight of 150 is refused in one line, in the studio's words (no pydantic
    text, no link), before a model is opened or a tensor merged."""
    from soup_ui.engine import stream, studio

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the weights were checked")

    monkeypatch.setattr(studio.Studio, "__init__", no_work)
    monkeypatch.setattr(stream, "export", no_work)
    out = ["--out", str(tmp_path / ("x.png" if command == "render" else "x.safetensors"))]
    assert main([command, "--preset", str(tiny_preset), "--mix", "alpha=150,beta=1", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: weight of alpha must be between 0 and 100, got 150"


def test_a_soup_png_names_its_preset_portably_and_says_its_recipe_once_with_a_model_hash(tmp_path):
    """Issue 35, item 7: a served or rendered PNG carried the server's absolute preset path (its
    recipe failed on another checkout), and its parameters had no Model hash and said the label twice."""
    import json

    from PIL import Image

    from soup_ui.cli import main
    from soup_ui.modelfiles.presets import load_recipe

    out = tmp_path / "r"
    assert main(["render", "--mix", "twemoji=1,openmoji=1", "--steps", "4", "--out-dir", str(out)]) == 0
    info = Image.open(out / "soup.png").text
    assert json.loads(info["soup_ui.recipe"])["preset"] == "emoji-styles.yaml"
    params = info["parameters"]
    assert "Model: soup, Soup: soup: 0.50 twemoji + 0.50 openmoji" in params and params.count("0.50 twemoji") == 1
    assert "Model hash: " in params
    moved = tmp_path / "elsewhere" / "soup.png"  # the image elsewhere; the recipe still finds this checkout's preset
    moved.parent.mkdir()
    moved.write_bytes((out / "soup.png").read_bytes())
    assert load_recipe(moved).preset.name == "emoji-styles.yaml" and load_recipe(moved).preset.is_file()
    data = json.loads(info["soup_ui.recipe"])
    data["preset"] = "/home/someone/studio/presets/emoji-styles.yaml"  # an absolute path from another machine
    (tmp_path / "other.yaml").write_text(json.dumps(data))
    assert load_recipe(tmp_path / "other.yaml").preset.is_file()
