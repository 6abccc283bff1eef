"""The Mix: built once (names resolved, weights normalized, method and parameters validated), with its key and label."""

from pathlib import Path

import pytest

from soup_ui.errors import StudioError
from soup_ui.engine.mix import Mix
from soup_ui.engine.pool import Shard, Weights


def view(*names):
    return {n: Shard(n, Weights(Path(f"{n}.safetensors"), f"sha-{n}", None)) for n in names}


def test_weights_are_normalized_once_and_labelled_with_shares_that_add_up():
    v = view("a", "b", "c")
    assert Mix.build(v, {"a": 0.375, "b": 0.625}).label == "soup: 0.38 a + 0.62 b"
    assert Mix.build(v, {"a": 1, "b": 1, "c": 1}).label == "soup: 0.34 a + 0.33 b + 0.33 c"
    m = Mix.build(v, {"a": 3, "b": 0, "c": 1})
    assert m.weights == (0.75, 0.0, 0.25) and m.label == "soup: 0.75 a + 0.25 c"


def test_key_depends_on_contents_weights_method_and_params_not_on_scale_of_weights():
    v = view("a", "b")
    assert Mix.build(v, {"a": 1, "b": 1}).key == Mix.build(v, {"a": 2, "b": 2}).key
    assert Mix.build(v, {"a": 1, "b": 1}) == Mix.build(v, {"a": 5, "b": 5})
    ties = Mix.build(v, {"a": 1, "b": 1}, "ties", {"density": 0.3})
    assert ties.key != Mix.build(v, {"a": 1, "b": 1}, "ties", {"density": 0.4}).key
    assert ties.key != Mix.build(v, {"a": 1, "b": 1}).key
    assert ties.label == "ties (density 0.3, lambda 1): 0.50 a + 0.50 b"
    assert Mix.build(v, {"a": 1, "b": 1}, "task-arithmetic", {"lambda": 1.5}).label == "task arithmetic: base + 1.5 x (0.50 a + 0.50 b - base)"


def test_add_difference_puts_the_subtracted_shard_last_and_keys_it_by_content():
    v = view("a", "b", "c")
    m = Mix.build(v, {"c": 1, "a": 1, "b": 1}, "add-difference", {"alpha": 0.5, "c": "c"})
    assert m.names == ["a", "b", "c"] and m.label == "add difference: a + 0.5 x (b - c)"
    assert ("c", "sha-c") in m.key[1]
    with pytest.raises(StudioError, match="add-difference: c = 'z': not one of the selected shards \\(a, b, c\\) nor 'base'"):
        Mix.build(v, {"a": 1, "b": 1, "c": 1}, "add-difference", {"c": "z"})
    with pytest.raises(StudioError, match="select 2 shards with c = 'base', or 3 with c naming one; 3 selected"):
        Mix.build(v, {"a": 1, "b": 1, "c": 1}, "add-difference")


def test_bad_requests_are_refused_naming_what_is_wrong():
    v = view("a", "b")
    with pytest.raises(StudioError, match="unknown shard 'z' \\(loaded: a, b\\)"):
        Mix.build(v, {"z": 1})
    with pytest.raises(StudioError, match="weight of a must be between 0 and 100, got -1"):
        Mix.build(v, {"a": -1, "b": 1})
    with pytest.raises(StudioError, match="ties: density must be between 0 and 1, got 2"):
        Mix.build(v, {"a": 1, "b": 1}, "ties", {"density": 2})
    with pytest.raises(StudioError, match="unknown merge method 'tie'"):
        Mix.build(v, {"a": 1}, "tie")


def test_derived_mixes_keep_method_and_params():
    v = view("a", "b", "c")
    m = Mix.build(v, {"a": 1, "b": 1, "c": 2}, "dare", {"density": 0.3, "seed": 4})
    rest = m.without("c")
    assert rest.names == ["a", "b"] and rest.weights == (0.5, 0.5)
    assert rest.method.name == "dare" and rest.params == m.params
    assert m.reweighted({"a": 1}).params.values() == {"density": 0.3, "lambda": 1.0, "seed": 4, "rng": "counter"}
    assert m.recipe() == {
        "method": "dare", "params": {"density": 0.3, "lambda": 1.0, "seed": 4, "rng": "counter"}, "text_encoders": False,
        "shards": [{"name": "a", "sha256": "sha-a", "weight": 0.25}, {"name": "b", "sha256": "sha-b", "weight": 0.25},
                   {"name": "c", "sha256": "sha-c", "weight": 0.5}],
    }


def test_random_methods_draw_by_counter_and_recipes_saved_before_it_keep_torchs_draws():
    """rng: 'counter' is the default and goes unsaid in the label; a DARE, DARE-TIES or DELLA recipe
    without rng (saved before the counter draws) is read with rng 'torch' (DELLA: and exact ranks),
    so it renders what it did."""
    from soup_ui.modelfiles.presets import Recipe

    v = view("a", "b")
    counter = Mix.build(v, {"a": 1, "b": 1}, "dare", {"density": 0.3})
    legacy = Mix.build(v, {"a": 1, "b": 1}, "dare", {"density": 0.3, "rng": "torch"})
    assert counter.label == "dare (density 0.3, lambda 1, seed 0): 0.50 a + 0.50 b"
    assert legacy.label == "dare (density 0.3, lambda 1, seed 0, rng torch): 0.50 a + 0.50 b"
    assert counter.key != legacy.key
    assert Mix.build(v, {"a": 1}, "della", {"ranks": "exact"}).label == "della (density 0.5, epsilon 0.1, lambda 1, seed 0, ranks exact): 1.00 a"
    assert Mix.build(v, {"a": 1}, "della").label == "della (density 0.5, epsilon 0.1, lambda 1, seed 0): 1.00 a"
    for name in ("dare", "dare-ties", "della"):
        old = Recipe.model_validate({"mix": {"a": 1}, "method": name, "params": {"density": 0.3, "seed": 2}})
        assert old.params == {"density": 0.3, "seed": 2, "rng": "torch", **({"ranks": "exact"} if name == "della" else {})}
    assert Recipe.model_validate({"mix": {"a": 1}, "method": "dare", "params": {"rng": "counter"}}).params == {"rng": "counter"}
    assert Recipe.model_validate({"mix": {"a": 1}, "method": "ties"}).params == {}
    saved = Recipe.of(None, counter, Recipe.model_fields["render"].default)
    assert Recipe.model_validate(saved.model_dump(mode="json")).params["rng"] == "counter"
