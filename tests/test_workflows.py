"""The paper's workflows through the library: leave-one-out, interpolation, grids, ensemble, modes."""

import numpy as np
import pytest
import torch

from soup_ui.engine import workflows
from soup_ui.modelfiles.presets import RenderSettings
from soup_ui.engine.studio import StudioError

S = RenderSettings(prompt="a cat face", steps=3, guidance_scale=4.0, height=16, width=16, seed=2)


def px(image):
    return np.asarray(image).astype(int)


def test_leave_one_out(studio):
    mix = {"alpha": 1, "beta": 1, "gamma": 2}
    out = workflows.leave_one_out(studio, studio.make_mix(mix), S)
    assert [r.info.get("without") for r in out] == [None, "alpha", "beta", "gamma"]
    assert out[0].label == "full soup: 0.25 alpha + 0.25 beta + 0.50 gamma"
    for r, rest in zip(out[1:], [{"beta": 1, "gamma": 2}, {"alpha": 1, "gamma": 2}, {"alpha": 1, "beta": 1}]):
        assert np.array_equal(px(r.image), px(studio.render_soup(studio.make_mix(rest), S).image))
        assert r.info["pixels"] == pytest.approx(np.abs(px(r.image) - px(out[0].image)).mean(), abs=1e-4)
    # Removing the heaviest shard moves the weights the most.
    assert out[3].info["weights"] > out[1].info["weights"] > 0
    with pytest.raises(StudioError, match="at least two shards"):
        workflows.leave_one_out(studio, studio.make_mix({"alpha": 1}), S)


def test_interpolation_ends_are_the_endpoints(studio):
    out = workflows.interpolate(studio, studio.make_mix({"alpha": 1}), studio.make_mix({"beta": 1}), 3, S)
    assert [r.info["t"] for r in out] == [0.0, 0.5, 1.0]
    assert np.array_equal(px(out[0].image), px(studio.render_component(studio.shards["alpha"], S).image))
    assert np.array_equal(px(out[2].image), px(studio.render_component(studio.shards["beta"], S).image))
    assert np.array_equal(px(out[1].image), px(studio.render_soup(studio.make_mix({"alpha": 1, "beta": 1}), S).image))
    with pytest.raises(StudioError, match="between 2 and 32"):
        workflows.interpolate(studio, studio.make_mix({"alpha": 1}), studio.make_mix({"beta": 1}), 1, S)


def test_grid_axes(studio):
    x = workflows.Axis.parse("seed=0,1")
    y = workflows.Axis.parse("weight:beta=0,1")
    rows, row_labels, col_labels = workflows.grid(studio, studio.make_mix({"alpha": 1, "beta": 1}), S, x, y)
    assert row_labels == ["beta=0", "beta=1"] and col_labels == ["seed=0", "seed=1"]
    expected = studio.render_soup(studio.make_mix({"alpha": 1, "beta": 1}), S.model_copy(update={"seed": 1})).image
    assert np.array_equal(px(rows[1][1].image), px(expected))
    assert np.array_equal(px(rows[0][0].image), px(studio.render_component(studio.shards["alpha"], S.model_copy(update={"seed": 0})).image))
    assert workflows.Axis.parse("prompt=a cat|a dog").values == ("a cat", "a dog")
    with pytest.raises(StudioError, match="grid axis must be one of"):
        workflows.Axis.parse("colour=1,2")


def test_ensemble_of_one_is_the_component_and_of_two_is_near_the_soup(studio):
    single, _ = workflows.ensemble(studio, studio.make_mix({"beta": 1}), S)
    assert np.array_equal(px(single.image), px(studio.render_component(studio.shards["beta"], S).image))
    ens, soup = workflows.ensemble(studio, studio.make_mix({"alpha": 1, "gamma": 1}), S)
    assert ens.label.startswith("ensemble: 0.50 alpha + 0.50 gamma (")
    assert ens.info["pixels"] == pytest.approx(np.abs(px(ens.image) - px(soup.image)).mean(), abs=1e-4)


def test_task_arithmetic_mode(studio, tiny_preset):
    from safetensors.torch import load_file

    base = load_file(str(tiny_preset.parent / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    beta = load_file(str(tiny_preset.parent / "beta.safetensors"))
    label = studio.mix(studio.make_mix({"beta": 1}, method="task-arithmetic", params={"lambda": 2.0}))
    assert label == "task arithmetic: base + 2 x (1.00 beta - base)"
    for k in ("conv_in.weight", "conv_out.bias"):
        torch.testing.assert_close(studio.hybrid_tensors[k], base[k] + 2 * (beta[k] - base[k]), rtol=0, atol=1e-5)
    r1 = studio.render_soup(studio.make_mix({"beta": 1}, method="task-arithmetic", params={"lambda": 1.0}), S)
    assert np.array_equal(px(r1.image), px(studio.render_component(studio.shards["beta"], S).image))
    with pytest.raises(StudioError, match="unknown merge method .tiess."):
        studio.render_soup(studio.make_mix({"beta": 1}, method="tiess"), S)
