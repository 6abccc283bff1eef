"""The page's handlers, called directly: per-session shards, files, messages and scheduling."""

import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from soup_ui.engine import exports
from soup_ui.page import session as handlers
from soup_ui.files import umask
from soup_ui.modelfiles.presets import RenderSettings, load_preset
from soup_ui.page.session import Controls, StudioHost
from soup_ui.engine.studio import RuntimeOptions, Studio, StudioError

SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=3)


@pytest.fixture
def host(studio, tiny_preset, tmp_path):
    return StudioHost.of("tiny", studio, models_dirs=[tiny_preset.parent], output_dir=tmp_path / "out")


def controls(session, mix: dict, settings=SETTINGS, method="average", **params) -> Controls:
    return Controls(tuple(n in mix for n in session.names), tuple(mix.get(n, 0.0) for n in session.names), method, tuple(params.items()), settings)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sessions_add_and_remove_shards_for_themselves_only(host, studio):
    """Issue 12, item 2: another visitor's add or remove never changes this session's shards."""
    a, b = handlers.open_session(host, None), handlers.open_session(host, None)
    before_pool = len(studio.pool)
    handlers.remove_shard(host, a, "alpha")
    handlers.add_shard(host, a, "delta", "gamma.safetensors")
    assert a.names == ["beta", "gamma", "delta"]
    assert b.names == ["alpha", "beta", "gamma"] and list(studio.shards) == ["alpha", "beta", "gamma"]
    assert len(studio.pool) == before_pool  # delta has gamma's content: pooled once
    # b's ticks still mean b's shards: a row can never drive another session's shard.
    got = handlers.generate(host, b, controls(b, {"alpha": 1.0, "gamma": 1.0}))
    assert got.soup[1].startswith("soup: 0.50 alpha + 0.50 gamma")
    with pytest.raises(StudioError, match=r"unknown shard 'delta' \(loaded: alpha, beta, gamma\)"):
        studio.render_soup(studio.make_mix({"delta": 1.0}, shards=b.shards), SETTINGS)
    handlers.close_session(host, a)
    assert len(studio.pool) == before_pool


def test_weights_are_freed_when_no_session_uses_them(host, studio, tmp_path, tiny_preset):
    other = tmp_path / "other.safetensors"
    weights = load_file(str(tiny_preset.parent / "gamma.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(other))
    host.models_dirs.append(tmp_path.resolve())
    a, b = handlers.open_session(host, None), handlers.open_session(host, None)
    before = len(studio.pool)
    handlers.add_shard(host, a, "x", str(other))
    handlers.add_shard(host, b, "y", str(other))
    assert len(studio.pool) == before + 1
    handlers.remove_shard(host, a, "x")
    assert len(studio.pool) == before + 1  # b still uses it
    handlers.close_session(host, b)  # the page closed
    assert len(studio.pool) == before


def test_more_than_twelve_shards_and_the_limit(host):
    s = handlers.open_session(host, None)
    for i in range(handlers.MAX_SHARDS - 3):
        handlers.add_shard(host, s, f"copy{i}", "beta.safetensors")
    assert len(s.names) == handlers.MAX_SHARDS > 12
    got = handlers.generate(host, s, controls(s, {"copy12": 1.0, "alpha": 1.0}))
    assert [c for _, c in got.components] == ["alpha", "copy12"]
    with pytest.raises(ValueError, match=f"this page shows at most {handlers.MAX_SHARDS} shards; remove one first"):
        handlers.add_shard(host, s, "one-more", "beta.safetensors")
    handlers.close_session(host, s)


@pytest.mark.parametrize(
    "name, path, message",
    [
        ("", "beta.safetensors", "shard name ''"),
        ("alpha", "beta.safetensors", "already has a shard named 'alpha'"),
        ("x", "/etc/passwd", r"'/etc/passwd' is outside the model folders \(tiny\d*\)"),
        ("x", "../../etc/passwd", "is outside the model folders"),
        ("x", "nothing.safetensors", r"'nothing.safetensors': no such file or folder in the model folders"),
        ("x", "tiny.yaml", "not a .safetensors file"),
    ],
)
def test_bad_adds_name_the_problem_without_server_paths(host, name, path, message):
    s = handlers.open_session(host, None)
    with pytest.raises(ValueError, match=message) as err:
        handlers.add_shard(host, s, name, path)
    assert str(host.models_dirs[0]) not in str(err.value)  # no absolute server path is shown
    assert s.names == ["alpha", "beta", "gamma"]


def test_a_failed_upload_is_not_kept_and_the_temporary_copy_is_deleted(host, tmp_path, tiny_preset):
    """Items 8 and 15: validated before it is kept; Gradio's temporary copy never stays."""
    s = handlers.open_session(host, None)
    bad = tmp_path / "upload" / "bad.safetensors"
    bad.parent.mkdir()
    save_file({"conv_in.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(ValueError, match=r"shard 'mine' \(diffusers UNet\) does not match the base UNet: it lacks tensor 'conv_in.bias'"):
        handlers.add_shard(host, s, "mine", upload=str(bad))
    assert not bad.exists() and not (host.output_dir / "uploads").exists()
    good = tmp_path / "upload" / "good.safetensors"
    good.write_bytes((tiny_preset.parent / "gamma.safetensors").read_bytes())
    message = handlers.add_shard(host, s, "mine", upload=str(good))  # the same name is free
    assert "added shard **mine**" in message and not good.exists()
    kept = list((host.output_dir / "uploads").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == (tiny_preset.parent / "gamma.safetensors").read_bytes()
    handlers.close_session(host, s)


def test_soup_and_components_always_correspond(host, studio):
    """Item 5: a slider release after a prompt edit renders the components again too."""
    s = handlers.open_session(host, None)
    first = handlers.generate(host, s, controls(s, {"alpha": 1, "beta": 1}))
    moved = handlers.render_soup(host, s, controls(s, {"alpha": 1, "beta": 0.2}))
    assert moved.components is None  # same settings: only the soup
    edited = SETTINGS.model_copy(update={"prompt": "a blue car"})
    again = handlers.render_soup(host, s, controls(s, {"alpha": 1, "beta": 0.2}, edited))
    assert again.components is not None and len(again.components) == 2
    assert not np.array_equal(png(again.components[0][0]), png(first.components[0][0]))
    assert "seed 3" in again.soup[1] and "“a blue car”" in again.soup[1]


def test_image_files_are_whole_and_named_after_what_they_show(host):
    """Items 4 and 12: served PNGs are written once, atomically, named by shard or mix and seed."""
    s = handlers.open_session(host, None)
    got = handlers.generate(host, s, controls(s, {"alpha": 1, "gamma": 3}))
    names = [Path(p).name for p, _ in got.components] + [Path(got.soup[0]).name]
    assert names == ["alpha-seed3.png", "gamma-seed3.png", "soup-alpha25-gamma75-seed3.png"]
    again = handlers.generate(host, s, controls(s, {"alpha": 1, "gamma": 3}))
    assert again.soup[0] == got.soup[0]  # the same bytes are the same file, never rewritten
    assert not list(Path(got.soup[0]).parent.glob(".*"))  # no temporary left


def test_exports_and_recipes_are_offered_and_readable(host, studio):
    """Items 1 and 12: the page gets a str path; files are 0644-like, folders 0755-like; the
    overwrite tick is honoured by the pipeline export too (item 8)."""
    s = handlers.open_session(host, None)
    c = controls(s, {"alpha": 1, "beta": 1})
    path, message = handlers.save_recipe(host, s, c, "r1", False)
    assert isinstance(path, str) and Path(path).is_file() and f"recipes/{s.visitor}/r1.yaml" in message
    with pytest.raises(ValueError, match="recipes/r1.yaml exists; tick 'overwrite'"):
        handlers.save_recipe(host, s, c, "r1", False)
    path, _ = handlers.export_unet(host, s, c, "soup", False)
    assert isinstance(path, str) and stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()
    # The UNet and the single file never share a name (one refused the other as "exists").
    single, _ = handlers.export_unet(host, s, c, "soup", False, single_file=True)
    assert (Path(path).name, Path(single).name) == ("soup-unet.safetensors", "soup.safetensors")
    archive, message = handlers.export_pipeline(host, s, c, "pipe", False)
    folder = host.output_dir / "pipelines" / s.visitor / "pipe"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask()
    import zipfile

    with zipfile.ZipFile(archive) as z:  # the folder, offered as one download
        names = set(z.namelist())
    assert "pipe/model_index.json" in names and "pipe/unet/diffusion_pytorch_model.safetensors" in names and "pipe.zip" in message
    with pytest.raises(ValueError, match="pipelines/pipe exists; tick 'overwrite'"):
        handlers.export_pipeline(host, s, c, "pipe", False)
    before = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    handlers.export_pipeline(host, s, controls(s, {"gamma": 1}), "pipe", True)
    after = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(before["conv_in.weight"], after["conv_in.weight"])
    with pytest.raises(ValueError, match="give a file name"):
        handlers.save_recipe(host, s, c, "  ", False)


def test_pipeline_export_copies_only_what_the_pipeline_loads(tiny_preset, studio, tmp_path):
    """Item 17: no .git, no stray files, no pickles from the base folder."""
    base = Path(studio.preset.base)
    (base / ".git").mkdir(exist_ok=True)
    (base / ".git" / "HEAD").write_text("ref")
    (base / "notes.bin").write_bytes(b"0" * 1000)
    (base / "vae" / "old.ckpt").write_bytes(b"0")
    try:
        out = exports.pipeline_folder(studio, studio.make_mix({"alpha": 1}), tmp_path / "p")
        copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert not any(".git" in c or c.endswith((".bin", ".ckpt")) for c in copied), copied
        assert "model_index.json" in copied and "vae/diffusion_pytorch_model.safetensors" in copied
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    finally:
        import shutil

        shutil.rmtree(base / ".git")
        (base / "notes.bin").unlink()
        (base / "vae" / "old.ckpt").unlink()


def test_save_preset_keeps_ticks_and_weights_and_is_offered(host):
    """Item 10: the ticked shards with their current weights; an empty name is refused."""
    s = handlers.open_session(host, None)
    with pytest.raises(ValueError, match="give a file name"):
        handlers.save_preset(host, s, controls(s, {"alpha": 0.3}), "", False)
    key, message = handlers.save_preset(host, s, controls(s, {"alpha": 0.3, "gamma": 0.6}), "mine", False)
    saved = load_preset(host.presets[key])
    assert [(x.name, x.weight) for x in saved.shards] == [("alpha", 0.3), ("gamma", 0.6)]
    assert key in host.presets and "in the preset list of every page" in message
    assert saved.description == "2 shards saved from tiny: alpha, gamma"  # its own, not the source preset's
    # Listed again by a server started later on the same output folder (it was gone after a reload).
    again = StudioHost([host.presets[host.default]], output_dir=host.output_dir)
    assert again.presets[key] == host.presets[key]


def test_interpolate_needs_two_different_ends(host):
    s = handlers.open_session(host, None)
    with pytest.raises(ValueError, match="give the mix to interpolate to"):
        handlers.interpolate(host, s, controls(s, {"alpha": 1}), "soup", "", 5)
    with pytest.raises(StudioError, match="the two ends of the interpolation are the same mix"):
        handlers.interpolate(host, s, controls(s, {"alpha": 1}), "soup", "alpha", 5)


@pytest.mark.parametrize(
    "values, message",
    [
        (("p", "", 0, 0, 5.0, "dpm++", 16, 16), r"settings: steps: Input should be greater than or equal to 1 \(got 0\)"),
        (("p", "", 0, 1000, 5.0, "dpm++", 16, 16), r"settings: steps: Input should be less than or equal to 150 \(got 1000\)"),
        (("p", "", 0, 20, 5.0, "dpm++", 17, 16), r"settings: height: must be divisible by 8 but is 17"),
    ],
)
def test_settings_are_never_clamped_silently(values, message):
    with pytest.raises(ValueError, match=message):
        handlers.settings_from(*values)


def test_grid_axis_out_of_range_is_a_plain_message(host):
    s = handlers.open_session(host, None)
    with pytest.raises(StudioError) as err:
        handlers.grid(host, s, controls(s, {"alpha": 1}), "steps=0,5", "seed=0")
    assert str(err.value) == "grid axis steps: steps=0 is not allowed (steps: Input should be greater than or equal to 1)"
    assert "http" not in str(err.value)


def test_long_workflows_give_way_to_interactive_renders(studio):
    """Item 13: a grid takes the lock per image at background priority; a slider release waits for
    at most the image being rendered, not for the whole grid."""
    from soup_ui.engine.workflows import Axis, grid

    studio.renderer.images.clear()
    done = {}
    x, y = Axis.parse("seed=" + ",".join(str(500 + i) for i in range(6))), Axis.parse("guidance=1,2,3,4")
    total = len(x.values) * len(y.values)
    begin = studio.renderer.renders["soup"]
    mix = studio.make_mix({"alpha": 1, "beta": 1})
    grid_thread = threading.Thread(target=lambda: done.setdefault("grid", grid(studio, mix, SETTINGS, x, y)))
    grid_thread.start()
    deadline = time.monotonic() + 120
    while studio.renderer.renders["soup"] == begin:
        assert grid_thread.is_alive() and time.monotonic() < deadline, "the grid ended or stalled before its first image"
        time.sleep(0.01)
    start = studio.renderer.renders["soup"]
    studio.render_soup(studio.make_mix({"alpha": 1, "gamma": 1}), SETTINGS.model_copy(update={"seed": 999}))
    during = studio.renderer.renders["soup"] - start  # grid images rendered while the interactive one waited
    grid_thread.join()
    assert during <= 2, during  # the one in progress (and the interactive soup itself)
    assert studio.renderer.renders["soup"] - begin == total + 1  # the grid went on after it
    assert len(done["grid"][0]) == 4


def test_messages_keep_their_quotes():
    """Item 12: a message that ends in a quote keeps it."""
    import gradio as gr

    from soup_ui.page.ui import user_errors

    @user_errors
    def fails():
        raise ValueError("'/etc/passwd' is outside the model folders ('tiny')")

    with pytest.raises(gr.Error) as err:
        fails()
    assert err.value.message == "'/etc/passwd' is outside the model folders ('tiny')"


def test_lean_mode_rehashes_a_rewritten_file(tiny_preset, tmp_path):
    """Item 18: a shard file rewritten on disk is never served under its old hash."""
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_preset.parent, folder, ignore=shutil.ignore_patterns("*.log", "outputs"))
    lean = Studio(load_preset(folder / "tiny.yaml"), RuntimeOptions(lean=True))
    old_sha = lean.shards["beta"].sha256
    before = np.asarray(lean.render_soup(lean.make_mix({"beta": 1}), SETTINGS).image)
    weights = load_file(str(folder / "beta.safetensors"))
    save_file({k: v + 0.05 for k, v in weights.items()}, str(folder / "beta.safetensors"))  # in place, same name
    after = lean.render_soup(lean.make_mix({"beta": 1}), SETTINGS)
    assert lean.shards["beta"].sha256 != old_sha
    assert not np.array_equal(before, np.asarray(after.image))
    assert lean.make_mix({"beta": 1}).recipe()["shards"][0]["sha256"] == lean.shards["beta"].sha256


def test_task_arithmetic_in_the_studio_uses_one_rounding_and_the_base_in_memory(tiny_preset):
    """Item 19: fp16 task arithmetic is one rounding of the exact result; the base is read once."""
    from soup_ui.modelfiles import checkpoints

    fp16 = Studio(load_preset(tiny_preset), RuntimeOptions(dtype="float16"))
    base = {k: v.half().double() for k, v in checkpoints.load_weights(Path(fp16.preset.base) / "unet").items()}  # as the studio holds it
    shards = {n: {k: v.double() for k, v in fp16.shards[n].tensors.items()} for n in ("alpha", "beta")}
    reads = []
    original = checkpoints.LazyWeights.__getitem__
    checkpoints.LazyWeights.__getitem__ = lambda self, name: reads.append(name) or original(self, name)
    try:
        fp16.mix(fp16.make_mix({"alpha": 1, "beta": 1}, method="task-arithmetic", params={"lambda": 2.5}))
        first = len(reads)
        fp16.mix(fp16.make_mix({"alpha": 1, "beta": 2}, method="task-arithmetic", params={"lambda": 2.5}))
        assert len(reads) == first  # the base was kept, not read again
    finally:
        checkpoints.LazyWeights.__getitem__ = original
    wrong = total = 0
    for k, out in fp16.hybrid_tensors.items():
        exact = base[k] + 2.5 * ((shards["alpha"][k] + 2 * shards["beta"][k]) / 3 - base[k])
        wrong += int((out != exact.to(torch.float16)).sum())
        total += out.numel()
    assert wrong / total < 0.01, wrong / total  # one rounding (float32 sums may round twice, rarely)


def test_importing_the_library_leaves_the_environment_alone():
    import subprocess
    import sys

    code = "import os; before = dict(os.environ); import soup_ui, soup_ui.engine.studio, soup_ui.page.session; print(dict(os.environ) == before)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADIO_", "DO_NOT_TRACK"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_a_superseded_render_shows_nothing(host):
    s = handlers.open_session(host, None)
    old = s.ticket()
    s.ticket()  # a newer click
    got = handlers.generate(host, s, controls(s, {"alpha": 1}), ticket=old)
    assert got.superseded and s.rendered is None


def test_the_pages_workflows_use_the_chosen_method_and_parameters(host, studio):
    """Leave-one-out, interpolation, grid and the ensemble render with the page's method and lambda
    (they used to render plain averages whatever was selected)."""
    from soup_ui.engine.workflows import Axis, grid

    s = handlers.open_session(host, None)
    c = controls(s, {"alpha": 1, "beta": 1}, method="task-arithmetic", **{"lambda": 1.5})
    expected = studio.render_soup(studio.make_mix({"alpha": 1, "beta": 1}, "task-arithmetic", {"lambda": 1.5}), SETTINGS)
    assert expected.label == "task arithmetic: base + 1.5 x (0.50 alpha + 0.50 beta - base)"
    loo = handlers.leave_one_out(host, s, c)
    assert loo[0][1] == "full " + expected.label
    assert np.array_equal(png(loo[0][0]), np.asarray(expected.image.convert("RGB"), dtype=np.int16))
    assert loo[1][1].startswith("without alpha:")
    without_alpha = studio.render_soup(studio.make_mix({"beta": 1}, "task-arithmetic", {"lambda": 1.5}), SETTINGS)
    assert np.array_equal(png(loo[1][0]), np.asarray(without_alpha.image.convert("RGB"), dtype=np.int16))
    strip = handlers.interpolate(host, s, c, "soup", "alpha", 3)
    assert strip[0][1] == "t=0.00: " + expected.label
    assert strip[2][1] == "t=1.00: task arithmetic: base + 1.5 x (1.00 alpha - base)"
    rows, _, _ = grid(studio, c.mix(s), SETTINGS, Axis.parse("weight:beta=0,1"), Axis.parse("seed=3"))
    assert [r.label for r in rows[0]] == ["task arithmetic: base + 1.5 x (1.00 alpha - base)", expected.label]
    ens = handlers.ensemble(host, s, c)
    assert ens[0][1].startswith("ensemble: 0.75 alpha + 0.75 beta + -0.50 base") and ens[1][1] == expected.label


def test_a_non_linear_method_through_the_page_handlers(host, studio):
    s = handlers.open_session(host, None)
    c = controls(s, {"alpha": 1, "beta": 1, "gamma": 1}, method="ties", density=0.3)
    images = handlers.generate(host, s, c)
    assert images.soup[1].startswith("ties (density 0.3, lambda 1): 0.34 alpha + 0.33 beta + 0.33 gamma")
    with pytest.raises(ValueError, match="the ensemble reference sums the components' predictions .* ties has none"):
        handlers.ensemble(host, s, c)
    with pytest.raises(ValueError, match="ties: density must be between 0 and 1, got 1.5"):
        handlers.generate(host, s, controls(s, {"alpha": 1}, method="ties", density=1.5))


def test_a_slider_release_builds_its_mix_once_and_normalizes_once(host, monkeypatch):
    import soup_ui.engine.mix as mix_module

    s = handlers.open_session(host, None)
    handlers.generate(host, s, controls(s, {"alpha": 1, "beta": 1}))
    builds, normalizations = [], []
    build, normalize = mix_module.Mix.build.__func__, mix_module.normalize_weights
    monkeypatch.setattr(mix_module.Mix, "build", classmethod(lambda cls, *a, **k: builds.append(1) or build(cls, *a, **k)))
    monkeypatch.setattr(mix_module, "normalize_weights", lambda *a, **k: normalizations.append(1) or normalize(*a, **k))
    handlers.render_soup(host, s, controls(s, {"alpha": 1, "beta": 0.3}))  # the components are current: the soup alone
    assert (len(builds), len(normalizations)) == (1, 1)
    edited = SETTINGS.model_copy(update={"seed": 11})
    handlers.render_soup(host, s, controls(s, {"alpha": 1, "beta": 0.3}, edited))  # components stale: rendered again too
    assert (len(builds), len(normalizations)) == (2, 2)


def test_mixing_text_encoders_where_no_shard_has_one_says_so(host, studio):
    """Issue 22 item 6: the tick did nothing, silently, on a preset of UNet files."""
    s = handlers.open_session(host, None)
    c = controls(s, {"alpha": 1, "beta": 1})
    assert handlers.generate(host, s, c).note == ""
    ticked = Controls(c.flags, c.weights, c.method, c.params, c.settings, text_encoders=True)
    note = handlers.generate(host, s, ticked).note
    assert note.startswith("“Mix text encoders too” changes nothing here: none of the ticked shards has a text encoder of its own")
    assert "changes nothing here" in handlers.render_soup(host, s, ticked).note


def test_long_work_reports_its_share_and_time_left():
    """Issue 22 item 15: workflows showed a spinner with no progress or ETA."""
    from soup_ui.page.ui import with_eta

    shown, now = [], [100.0]
    report = with_eta(lambda f, desc: shown.append((f, desc)), clock=lambda: now[0])
    now[0] = 104.0
    report(0.25, "soup without alpha")
    now[0] = 112.0
    report(0.75, "soup without gamma")
    report(1.0, "done")
    # The share is Gradio's to draw (it appends " - 25.0%"): the text says it no second time (issue 35, item 5).
    assert shown == [(0.25, "soup without alpha, about 12 s left"), (0.75, "soup without gamma, about 4 s left"), (1.0, "done")]


def test_two_visitors_never_share_an_export_name(host):
    """Issue 35, item 8: visitor B was told A's file exists, and with 'overwrite' replaced it. Each
    visitor now writes in a folder of its own (kept across a preset switch)."""
    a, b = handlers.open_session(host, None), handlers.open_session(host, None)
    path_a, _ = handlers.export_unet(host, a, controls(a, {"alpha": 1}), "soup", False)
    before = Path(path_a).read_bytes()
    path_b, message = handlers.export_unet(host, b, controls(b, {"beta": 1}), "soup", False)  # not "exists"
    assert path_a != path_b and Path(path_b).is_file() and "soup-unet.safetensors" in message
    handlers.export_unet(host, b, controls(b, {"gamma": 1}), "soup", True)  # B's overwrite touches B's file only
    assert Path(path_a).read_bytes() == before
    assert handlers.open_session(host, None, a).visitor == a.visitor


def test_a_page_s_ticket_never_goes_back(host):
    """Issue 35, item 9: a request could draw its number, then record it after a later request
    recorded its own: `latest` went back and an older render was shown last."""
    session = handlers.open_session(host, None)
    second_done = threading.Event()

    class Numbers:  # the first number is drawn, then held until the second request has finished
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            if self.n == 1:
                second_done.wait(1.0)  # with the fix, the second waits for the first's lock: this wait times out
            return self.n

    session.tickets = Numbers()
    first = threading.Thread(target=session.ticket)
    first.start()
    while session.tickets.n == 0:
        time.sleep(0.001)
    second = threading.Thread(target=lambda: (session.ticket(), second_done.set()))
    second.start()
    first.join(5)
    second.join(5)
    assert session.latest == 2


def test_a_typed_negative_weight_is_refused_in_place_not_read_as_nothing_to_mix(host):
    """Issue 35, item 4: a typed -1 beside a 1 showed 0 in the box, "beta 100%" in the bar and
    "nothing to mix" under the soup. The bar and the render now name the weight out of range."""
    from soup_ui.page.parts import mixture_html

    s = handlers.open_session(host, None)
    with pytest.raises(ValueError, match="weight of alpha must be between 0 and 100, got -1"):
        handlers.render_soup(host, s, controls(s, {"alpha": -1, "beta": 1}))
    bar = mixture_html(["alpha", "beta"], [-1, 1])
    assert "weight of alpha must be between 0 and 100, got -1" in bar and "100%" not in bar


def test_the_history_keeps_one_entry_per_soup_and_comes_back_after_a_reload(host):
    """Issue 35, item 6: an entry was added on every release, even for the same soup, and the history
    was lost on reload. One entry per distinct soup (seen again: moved to the front), captions that
    tell entries apart, and the browser's saved state brings it back (only images the server serves)."""
    s = handlers.open_session(host, None)
    for mix in ({"alpha": 1, "beta": 1}, {"alpha": 1, "beta": 3}, {"alpha": 1, "beta": 1}):
        handlers.render_soup(host, s, controls(s, mix))
    assert [c for _, c in s.history_items()] == ["alpha 50 beta 50 · s3", "alpha 25 beta 75 · s3"]
    saved = handlers.saved_state(s)
    saved["history"].append(["/etc/passwd", "x", saved["history"][0][2]])  # not an image the server serves: ignored
    again = handlers.open_session(host, None)
    assert handlers.restore_history(host, again, saved) == 2
    assert again.history_items() == s.history_items()
    assert handlers.history_recipe(again, 1)[0] == {"alpha": 1.0, "beta": 3.0}


def test_a_preset_loading_for_one_visitor_holds_up_no_other(studio, tiny_preset):
    """Issue 35, item 9: one visitor's preset load held the host's lock for the whole load, so every
    other page waited for it. Loads now hold a lock of their own preset only."""
    release, loading = threading.Event(), threading.Event()

    def loader(preset, options, progress):
        loading.set()
        assert release.wait(60), "never released"
        return studio

    from conftest import second_preset

    host = StudioHost([tiny_preset, second_preset(tiny_preset)], loader=loader)
    host._studios[host.default] = studio  # the first preset is loaded
    other = next(n for n in host.presets if n != host.default)
    slow = threading.Thread(target=host.get, args=(other,))
    slow.start()
    assert loading.wait(30)
    got = []
    quick = threading.Thread(target=lambda: got.append(host.get(None)))
    quick.start()
    quick.join(10)  # generous: it takes a moment, the other load never ends until released
    loaded_while_other_loads = bool(got)
    release.set()
    slow.join(30)
    quick.join(30)
    assert loaded_while_other_loads and got == [studio] and host.get(other) is studio


def test_an_image_served_again_is_never_pruned_as_old(host, studio):
    """Issue 35, item 9: an image folder last written over an hour ago and served again now was pruned
    (its age was its first write): the page then showed a missing file."""
    from soup_ui.engine.render import Rendered

    image = Rendered("soup", Image.new("RGB", (8, 8), (200, 10, 10)), "soup")
    path = Path(host.image_file(image, "red"))
    old = time.time() - 7200
    os.utime(path.parent, (old, old))
    assert host.image_file(image, "red") == str(path)  # served again
    host.prune_images()
    assert path.is_file()
    os.utime(path.parent, (old, old))
    host.prune_images()  # not served again: pruned
    assert not path.exists()
