"""The engine: rendering from shared noise, the cache, concurrency and export."""

import json
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from soup_ui.engine import exports
from soup_ui.modelfiles.checkpoints import sha256_file
from soup_ui.modelfiles.presets import RenderSettings
from soup_ui.engine.studio import StudioError

SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=0)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_render_gives_components_then_the_labelled_soup(studio):
    results = studio.render(studio.make_mix({"alpha": 1, "beta": 1}), SETTINGS)
    assert [r.label for r in results] == ["alpha", "beta", "soup: 0.50 alpha + 0.50 beta"]
    assert [r.kind for r in results] == ["component", "component", "soup"]
    assert all(r.image.size == (16, 16) for r in results)
    assert not np.array_equal(pixels(results[0].image), pixels(results[1].image))


def test_a_weight_change_renders_only_the_soup(studio):
    settings = SETTINGS.model_copy(update={"seed": 11})
    studio.render(studio.make_mix({"alpha": 0.5, "gamma": 0.5}), settings)
    before = studio.renderer.renders.copy()
    first = studio.render(studio.make_mix({"alpha": 0.5, "gamma": 0.5}), settings)
    assert studio.renderer.renders == before  # all cached
    second = studio.render(studio.make_mix({"alpha": 0.2, "gamma": 0.8}), settings)
    assert studio.renderer.renders["component"] == before["component"]
    assert studio.renderer.renders["soup"] == before["soup"] + 1
    assert np.array_equal(pixels(first[0].image), pixels(second[0].image))
    assert not np.array_equal(pixels(first[-1].image), pixels(second[-1].image))
    studio.render(studio.make_mix({"alpha": 0.5, "gamma": 0.5}), settings.model_copy(update={"seed": 12}))
    assert studio.renderer.renders["component"] == before["component"] + 2  # a new seed is a new image


def test_soup_with_weights_one_zero_is_the_component(studio):
    settings = SETTINGS.model_copy(update={"seed": 21})
    component = studio.render_component(studio.shards["beta"], settings)
    soup = studio.render_soup(studio.make_mix({"alpha": 0.0, "beta": 1.0}), settings)
    assert np.array_equal(pixels(component.image), pixels(soup.image))
    assert soup.label == "soup: 1.00 beta"


def test_same_seed_same_noise(studio):
    a = studio.renderer.initial_noise(SETTINGS)
    b = studio.renderer.initial_noise(SETTINGS)
    c = studio.renderer.initial_noise(SETTINGS.model_copy(update={"seed": 1}))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "mix, message",
    [
        ({}, "no shard selected"),
        ({"alpha": 0, "beta": 0}, "sum to zero"),
        ({"alpha": -1}, "weight of alpha must be between 0 and 100"),
        ({"alpha": float("nan")}, "weight of alpha must be finite"),
        ({"zeta": 1}, r"unknown shard 'zeta' \(loaded: alpha, beta, gamma\)"),
    ],
)
def test_bad_mixes_raise_and_leave_the_hybrid_alone(studio, mix, message):
    before = {k: v.clone() for k, v in studio.hybrid_tensors.items()}
    with pytest.raises(StudioError, match=message):
        studio.render_soup(studio.make_mix(mix), SETTINGS)
    assert all(torch.equal(before[k], v) for k, v in studio.hybrid_tensors.items())


def test_prompt_too_long(studio):
    long = RenderSettings(prompt="a red apple " * 20, steps=1, height=16, width=16)
    with pytest.raises(StudioError, match=r"the prompt is \d+ tokens long; this model reads at most 16"):
        studio.render(studio.make_mix({"alpha": 1}), long)


def test_concurrent_mixes_each_get_their_own_weights(studio):
    mixes = [{"alpha": 1.0, "beta": 0.0}, {"alpha": 0.0, "beta": 1.0}, {"alpha": 0.3, "gamma": 0.7}, {"beta": 0.5, "gamma": 0.5}]
    settings = [SETTINGS.model_copy(update={"seed": 40 + i}) for i in range(4)]
    results = [None] * 8

    def work(i):
        results[i] = pixels(studio.render_soup(studio.make_mix(mixes[i % 4]), settings[i % 4]).image)

    studio.renderer.images.clear()  # force real renders, interleaved
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):  # reference: one at a time, no cache
        studio.renderer.images.clear()
        expected = pixels(studio.render_soup(studio.make_mix(mixes[i]), settings[i]).image)
        assert np.array_equal(results[i], expected) and np.array_equal(results[i + 4], expected)


def test_export_round_trip(studio, tmp_path, tiny_preset):
    out = exports.denoiser_file(studio, studio.make_mix({"alpha": 1, "gamma": 3}), tmp_path / "soup.safetensors")
    exported = load_file(str(out))
    folder = tiny_preset.parent
    alpha = load_file(str(folder / "alpha" / "diffusion_pytorch_model.safetensors"))
    gamma = load_file(str(folder / "gamma.safetensors"))
    assert set(exported) == set(alpha)
    for k in alpha:  # the average computed independently, in float64
        expected = (0.25 * alpha[k].double() + 0.75 * gamma[k].double()).float()
        torch.testing.assert_close(exported[k], expected, rtol=0, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["soup_ui.recipe"])
    assert recipe["shards"] == [
        {"name": "alpha", "sha256": sha256_file(folder / "alpha"), "weight": 0.25},
        {"name": "gamma", "sha256": sha256_file(folder / "gamma.safetensors"), "weight": 0.75},
    ]
    assert recipe["label"] == "soup: 0.25 alpha + 0.75 gamma"
    assert not list(tmp_path.glob(".*.tmp"))


def test_lean_mode_streams_shards_and_renders_the_same_images(tiny_preset, studio):
    from soup_ui.modelfiles.checkpoints import LazyWeights
    from soup_ui.modelfiles.presets import load_preset
    from soup_ui.engine.studio import RuntimeOptions, Studio

    lean = Studio(load_preset(tiny_preset), RuntimeOptions(lean=True))
    assert lean.lean and all(s.unet is None and isinstance(s.tensors, LazyWeights) for s in lean.shards.values())
    settings = SETTINGS.model_copy(update={"seed": 77})
    mix = {"alpha": 0.3, "beta": 0.7}
    for a, b in zip(lean.render(lean.make_mix(mix), settings), studio.render(studio.make_mix(mix), settings)):
        assert a.label == b.label
        assert np.array_equal(pixels(a.image), pixels(b.image))


def test_a_batched_render_gives_each_prompt_and_seed_its_own_image(studio):
    batch = [SETTINGS.model_copy(update={"prompt": p, "seed": s}) for p, s in (("a red apple", 3), ("a blue sky", 4), ("a red apple", 5))]
    together = studio.render_soup_batch(studio.make_mix({"alpha": 1, "beta": 2}), batch, batch_size=2)
    alone = [studio.render_soup(studio.make_mix({"alpha": 1, "beta": 2}), s).image for s in batch]
    assert len(together) == 3
    for a, b in zip(together, alone):  # the same image, up to the rounding of batched maths
        assert np.abs(pixels(a) - pixels(b)).max() <= 2
    assert np.abs(pixels(together[0]) - pixels(together[2])).mean() > 5  # seeds differ
    with pytest.raises(StudioError, match="same steps, guidance"):
        studio.render_soup_batch(studio.make_mix({"alpha": 1}), [SETTINGS, SETTINGS.model_copy(update={"steps": 4})])


def test_the_first_ties_of_a_server_never_waits_for_the_compiler(tiny_preset, monkeypatch):
    """Issue 35 item 10: the first TIES or DARE merge of a process compiled its kernels in the
    request (10-22 s). A server on an SD-sized model compiles the sparse methods' kernels at start,
    in the background; a merge before they are ready runs eager (the method note says so), and the
    first merge after adds no compiled graph: as quick as the second."""
    from torch._dynamo.utils import counters

    from soup_ui.engine.studio import Studio
    from soup_ui.maths import soup
    from soup_ui.maths.methods import kernels, warm
    from soup_ui.modelfiles.presets import load_preset
    from soup_ui.page.parts import method_note

    monkeypatch.setattr(soup, "WARM_UP_MIN", 1 << 10)  # the tiny model counts as SD-sized
    monkeypatch.setattr(kernels, "FUSED_MIN_ELEMENTS", 1 << 9)
    monkeypatch.setattr(soup, "BACKGROUND", True)
    monkeypatch.setattr(warm, "_ready", set())
    monkeypatch.setattr(warm, "COMPILED", ("ties",))  # a server compiles ties, dare, dare-ties and della alike; one is enough here
    gate, real = threading.Event(), warm.merge_into
    monkeypatch.setattr(warm, "merge_into", lambda *a, **k: gate.wait(120) and real(*a, **k))
    studio = Studio(load_preset(tiny_preset))
    assert [v[:2] for v in warm.compiling()] == [("ties", 3)]
    assert "ties's kernels for 3 shards are compiling in the background" in method_note("ties")
    mix = lambda density: studio.make_mix({"alpha": 1, "beta": 2, "gamma": 1}, "ties", {"density": density})  # noqa: E731
    graphs = counters["stats"]["unique_graphs"]
    studio.mix(mix(0.3))  # while compiling: eager, no compile in the request
    assert counters["stats"]["unique_graphs"] == graphs
    eager = {n: t.clone() for n, t in studio.hybrid_tensors.items()}
    gate.set()
    warm.join(300)
    assert not kernels._failed, kernels._failed
    assert [v[:2] for v in warm._ready] == [("ties", 3)] and "compiling" not in method_note("ties")
    graphs = counters["stats"]["unique_graphs"]
    for density in (0.3, 0.5):  # the first compiled TIES and the second
        studio.mix(mix(density))
        assert counters["stats"]["unique_graphs"] == graphs
        if density == 0.3:  # compiled and eager: the same weights
            assert all(torch.equal(eager[n], t) for n, t in studio.hybrid_tensors.items())
    gate = threading.Event()  # the next background compile waits too (the counter counts every thread's graphs)
    pair = studio.make_mix({"alpha": 1, "gamma": 1}, "ties", {"density": 0.5})  # 2 shards: not compiled yet, eager now, compiled behind
    studio.mix(pair)
    assert counters["stats"]["unique_graphs"] == graphs and [v[:2] for v in warm.compiling()] == [("ties", 2)]
    gate.set()
    warm.join(300)


def test_a_small_model_merges_ties_eager(studio, monkeypatch):
    """Below the soup's SD-size bound (the embedded default: 6 M weights), compiling TIES cost 10-22 s
    to save a fraction of a second: its merges run eager, in the CLI and in a server."""
    from torch._dynamo.utils import counters

    from soup_ui.maths.methods import kernels

    monkeypatch.setattr(kernels, "FUSED_MIN_ELEMENTS", 1 << 9)  # its larger tensors would run compiled
    graphs = counters["stats"]["unique_graphs"]
    studio.mix(studio.make_mix({"alpha": 1, "beta": 1}, "ties", {"density": 0.4}))
    assert counters["stats"]["unique_graphs"] == graphs
