"""Exported files as other tools read them: A1111's merge metadata, byte-reproducible files."""

import hashlib
import json

from safetensors import safe_open

from soup_ui.engine import exports
from soup_ui.modelfiles.checkpoints import sha256_file

A1111_RECIPE_KEYS = {  # what A1111's checkpoint merger writes in sd_merge_recipe (modules/extras.py, run_modelmerger)
    "type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash", "interp_method", "multiplier",
    "save_as_half", "custom_name", "config_source", "bake_in_vae", "discard_weights", "is_inpainting", "is_instruct_pix2pix",
}


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def a1111_legacy_hash(path):
    """A1111's model_hash(): sha256 of 0x10000 bytes at 0x100000, 8 hex digits (written here as A1111 has it)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[0:8]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_metadata_is_a1111s_layout_with_each_source_and_its_ancestry(studio, tiny_preset, tmp_path):
    """sd_merge_recipe is A1111's weighted-sum recipe (B's share as the multiplier, sources by sha256);
    sd_merge_models names each file with A1111's legacy hash, and a source that is itself a merge
    brings its recipe and its own sources, as A1111 does; our full recipe is under soup_ui.recipe."""
    folder = tiny_preset.parent
    first = exports.denoiser_file(studio, studio.make_mix({"beta": 1, "gamma": 3}), tmp_path / "first.safetensors")
    meta = metadata(first)
    recipe, models = json.loads(meta["sd_merge_recipe"]), json.loads(meta["sd_merge_models"])
    assert set(recipe) == A1111_RECIPE_KEYS
    beta, gamma = sha256_file(folder / "beta.safetensors"), sha256_file(folder / "gamma.safetensors")
    assert (recipe["type"], recipe["interp_method"], recipe["multiplier"]) == ("webui", "Weighted sum", 0.75)
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"], recipe["tertiary_model_hash"]) == (beta, gamma, None)
    assert models == {
        beta: {"name": "beta.safetensors", "legacy_hash": a1111_legacy_hash(folder / "beta.safetensors"), "sd_merge_recipe": None},
        gamma: {"name": "gamma.safetensors", "legacy_hash": a1111_legacy_hash(folder / "gamma.safetensors"), "sd_merge_recipe": None},
    }
    ours = json.loads(meta["soup_ui.recipe"])
    assert ours["method"] == "average" and [s["weight"] for s in ours["shards"]] == [0.25, 0.75]
    assert "modelspec.date" not in meta  # no timestamp unless asked (SOURCE_DATE_EPOCH)
    studio.add_shard("first", first)
    try:
        second = exports.denoiser_file(studio, studio.make_mix({"first": 1, "alpha": 1}, method="ties"), tmp_path / "second.safetensors")
        recipe, models = json.loads(metadata(second)["sd_merge_recipe"]), json.loads(metadata(second)["sd_merge_models"])
        assert (recipe["interp_method"], recipe["multiplier"], recipe["primary_model_hash"]) == ("ties", None, sha256_file(first))
        assert models[sha256_file(first)]["sd_merge_recipe"] == json.loads(meta["sd_merge_recipe"])  # its ancestry
        assert {beta, gamma} < set(models) and models[beta]["name"] == "beta.safetensors"
    finally:
        studio.remove_shard("first")


def test_the_same_recipe_exports_the_same_bytes(studio, tmp_path, monkeypatch):
    """safetensors writes its metadata map in a random order: two identical exports had different
    sha256. Sorted now, for the UNet file and the single file; a date only when asked."""
    mix = studio.make_mix({"alpha": 1, "beta": 2})
    for export in (exports.denoiser_file, exports.single_file):
        files = [export(studio, mix, tmp_path / f"{export.__name__}-{i}.safetensors") for i in range(4)]
        assert len({sha(f) for f in files}) == 1, export.__name__
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    dated = exports.denoiser_file(studio, mix, tmp_path / "dated.safetensors")
    assert metadata(dated)["modelspec.date"] == "2026-01-01"
    assert sha(dated) == sha(exports.denoiser_file(studio, mix, tmp_path / "dated-again.safetensors"))
