"""File-to-file soups (`soup_ui.engine.stream`, what `python -m soup_ui export` runs): the studio's export,
tensor for tensor, reading only the shards the mix uses and holding none of them."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soup_ui.engine import exports, stream
from soup_ui.cli import main
from soup_ui.modelfiles.presets import load_preset


def tensors_and_metadata(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize("method, weights, params", [
    ("average", {"alpha": 1, "beta": 2, "gamma": 1}, {}),
    ("task-arithmetic", {"alpha": 1, "gamma": 1}, {"lambda": 1.5}),
    ("ties", {"alpha": 1, "beta": 1, "gamma": 1}, {"density": 0.3}),
    ("dare", {"alpha": 1, "beta": 1}, {"density": 0.5, "seed": 3}),
    ("add-difference", {"alpha": 1, "beta": 1, "gamma": 1}, {"c": "gamma", "alpha": 0.7}),
])
@pytest.mark.parametrize("fmt", ["unet", "single-file"])
def test_a_streamed_export_is_the_studios_export(studio, tiny_preset, tmp_path, method, weights, params, fmt):
    preset = load_preset(tiny_preset)
    streamed, mix = stream.export(preset, weights, method, params, tmp_path / "streamed.safetensors", fmt)
    held = studio.make_mix(weights, method, params)
    assert mix.key == held.key
    export = exports.denoiser_file if fmt == "unet" else exports.single_file
    expected, expected_meta = tensors_and_metadata(export(studio, held, tmp_path / "held.safetensors"))
    got, meta = tensors_and_metadata(streamed)
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())
    assert meta == expected_meta


def test_a_streamed_soup_with_a_lora_shard_is_the_studios(studio, tiny_preset, tmp_path):
    import test_formats

    lora = test_formats.save_kohya_lora(studio, tmp_path / "lora.safetensors", seed=4)
    data = yaml.safe_load(tiny_preset.read_text())
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]] + [{"name": "lora", "path": str(lora)}]
    data["base"] = str(tiny_preset.parent / data["base"])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    streamed, _ = stream.export(load_preset(tmp_path / "p.yaml"), {"lora": 1, "beta": 1}, "average", {}, tmp_path / "s.safetensors")
    studio.add_shard("lora", lora)
    try:
        expected = studio.souped_weights(studio.make_mix({"lora": 1, "beta": 1}))
    finally:
        studio.remove_shard("lora")
    got = load_file(str(streamed))
    assert all(torch.allclose(got[k], v, rtol=0, atol=1e-6) for k, v in expected.items())


def test_export_and_render_read_only_the_shards_the_mix_uses(tiny_preset, tmp_path, capsys):
    """A preset shard the mix does not use is never opened: here it is corrupt, and export and
    render of the others work; naming it in the mix fails in one line naming it."""
    data = yaml.safe_load(tiny_preset.read_text())
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    data["shards"][2]["path"] = str(tmp_path / "broken.safetensors")  # gamma
    data["base"] = str(tiny_preset.parent / data["base"])
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(data))
    out = tmp_path / "soup.safetensors"
    assert main(["export", "--preset", str(preset), "--mix", "alpha=1,beta=1", "--format", "single-file", "--out", str(out)]) == 0
    assert json.loads(tensors_and_metadata(out)[1]["soup_ui.recipe"])["shards"][1]["name"] == "beta"
    assert main(["render", "--preset", str(preset), "--mix", "alpha=1,beta=1", "--out-dir", str(tmp_path / "r")]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["alpha.png", "beta.png", "soup.png"]
    capsys.readouterr()
    assert main(["export", "--preset", str(preset), "--mix", "alpha=1,gamma=1", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.safetensors" in err and len(err.splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()


def test_a_failed_streamed_export_closes_every_file_it_opened(tiny_preset, tmp_path):
    """Issue 33, defect 4: the stream's readers (the shards' and the base's) closed only when garbage
    collected; after a failure (a NaN met mid-stream) they stayed open for as long as anything held
    the error. Closed when the export ends, however it ends; nothing is written."""
    import psutil

    from soup_ui.modelfiles.checkpoints import CheckpointError

    data = yaml.safe_load(tiny_preset.read_text())
    beta = load_file(str(tiny_preset.parent / "beta.safetensors"))
    last = list(beta)[-1]
    beta[last] = torch.full_like(beta[last], float("nan"))
    save_file(beta, str(tmp_path / "nan.safetensors"))
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]] + [{"name": "nan", "path": str(tmp_path / "nan.safetensors")}]
    data["base"] = str(tiny_preset.parent / data["base"])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "soup.safetensors"

    def open_weights():
        return sorted(f.path for f in psutil.Process().open_files() if f.path.endswith(".safetensors"))

    before = open_weights()
    with pytest.raises(CheckpointError, match="NaN or Inf") as failed:
        stream.export(load_preset(tmp_path / "p.yaml"), {"alpha": 1, "nan": 1}, "average", {}, out)
    assert failed.value is not None and open_weights() == before  # while the error (and its frames) is held
    assert not out.exists()
