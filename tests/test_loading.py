"""Presets and checkpoints: every bad input gets a message naming what is wrong."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from soup_ui.modelfiles.checkpoints import CheckpointError, LazyWeights, data_ranges, load_weights, tensor_specs, weight_files
from soup_ui.modelfiles.presets import PresetError, load_preset
from soup_ui.engine.studio import Studio


def write_preset(folder, tiny_preset, mutate):
    data = yaml.safe_load(tiny_preset.read_text())
    data["base"] = str(tiny_preset.parent / "base")
    for s in data["shards"]:
        s["path"] = str(tiny_preset.parent / s["path"])
    mutate(data)
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preset_loads_with_paths_relative_to_its_file(tiny_preset):
    preset = load_preset(tiny_preset)
    assert [s.name for s in preset.shards] == ["alpha", "beta", "gamma"]
    assert preset.base == tiny_preset.parent / "base"
    assert preset.render.steps == 3


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(colour="red"), r"p.yaml: colour: unknown key"),
        (lambda d: d["shards"][1].update(name="alpha"), r"duplicate shard name 'alpha'"),
        (lambda d: d["shards"][0].update(path="missing.safetensors"), r"shards.0.path: no such file or folder 'missing.safetensors'"),
        (lambda d: d["render"].update(steps=0), r"render.steps: .*greater than or equal to 1.*\(got 0\)"),
        (lambda d: d["render"].update(height=70), r"render.height: must be divisible by 8 but is 70"),
        (lambda d: d["shards"][0].update(weight=-1), r"shards.0.weight: .*\(got -1\)"),
        (lambda d: d["render"].update(scheduler="magic"), r"render.scheduler: .*\(got 'magic'\)"),
        (lambda d: d.update(base="nowhere"), r"base: no such file or folder 'nowhere'"),
    ],
)
def test_bad_presets_name_file_key_and_value(tmp_path, tiny_preset, mutate, message):
    with pytest.raises(PresetError, match=message):
        load_preset(write_preset(tmp_path, tiny_preset, mutate))


def test_not_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("base: [unclosed")
    with pytest.raises(PresetError, match="bad.yaml: not valid YAML"):
        load_preset(tmp_path / "bad.yaml")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"shard{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoint, and loading it could run arbitrary code"):
        weight_files(path)


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="only pickle weights here"):
        weight_files(tmp_path)


def test_corrupt_safetensors_is_reported(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 50)
    with pytest.raises(CheckpointError, match="broken.safetensors: not a readable safetensors file"):
        tensor_specs(path)


def test_nan_is_reported_at_load(tmp_path, tiny_preset):
    weights = load_file(str(tiny_preset.parent / "beta.safetensors"))
    key = sorted(weights)[3]
    weights[key][0] = float("nan")
    save_file(weights, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' holds 1 NaN or Inf values"):
        load_weights(tmp_path / "nan.safetensors")


def make_variants(tmp_path, tiny_preset):
    """A shape mismatch, a foreign checkpoint, a dtype mismatch and a NaN shard."""
    weights = load_file(str(tiny_preset.parent / "beta.safetensors"))
    key = "conv_in.weight"
    shape = dict(weights)
    shape[key] = torch.zeros(8, 4, 3, 3)
    save_file(shape, str(tmp_path / "shape.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(tmp_path / "half.safetensors"))
    nan = {k: v.clone() for k, v in weights.items()}
    nan[key][0, 0, 0, 0] = float("inf")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    return key


def test_studio_reports_bad_shards_and_keeps_the_good_ones(tmp_path, tiny_preset):
    key = make_variants(tmp_path, tiny_preset)
    shutil.copy(tiny_preset.parent / "beta.safetensors", tmp_path / "good.safetensors")

    def mutate(d):
        d["shards"] = [
            {"name": "good", "path": str(tmp_path / "good.safetensors")},
            {"name": "shape", "path": str(tmp_path / "shape.safetensors")},
            {"name": "foreign", "path": str(tmp_path / "foreign.safetensors")},
            {"name": "half", "path": str(tmp_path / "half.safetensors")},
            {"name": "nan", "path": str(tmp_path / "nan.safetensors")},
        ]

    studio = Studio(load_preset(write_preset(tmp_path, tiny_preset, mutate)))
    assert list(studio.shards) == ["good", "half"]  # an fp16 shard of an fp32 base mixes (in fp32)
    assert studio.failed["shape"] == (
        f"shard 'shape' (diffusers UNet) does not match the base UNet: tensor '{key}' has shape [8, 4, 3, 3], the base has [16, 4, 3, 3]"
    )
    assert studio.failed["foreign"].startswith(
        "shard 'foreign' (LDM single-file checkpoint (UNet only)) does not match the base UNet: it lacks tensor"
    )
    assert f"tensor '{key}' holds 1 NaN or Inf values" in studio.failed["nan"]


def test_lazy_weights_know_where_each_tensor_lies(tmp_path):
    tensors = {"z.first": torch.arange(6.0).view(2, 3), "a.second": torch.ones(4, dtype=torch.float16), "m.third": torch.zeros(5)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    ranges = data_ranges(tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    for name, tensor in tensors.items():
        start, stop = ranges[name]
        assert raw[start:stop] == tensor.numpy().tobytes(), name
    lazy = LazyWeights(tmp_path / "w.safetensors")
    order = lazy.read_order()
    assert sorted(order) == sorted(tensors)
    assert [ranges[n][0] for n in order] == sorted(r[0] for r in ranges.values())  # front to back on disk
    assert all(torch.equal(lazy[n], tensors[n]) for n in tensors)
    lazy.close()


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_pickle_renamed_safetensors_is_named_and_never_unpickled(tmp_path, form, monkeypatch):
    """It was "not a readable safetensors file (... header too large)", like a text file."""
    import pickle

    path = tmp_path / "model.safetensors"
    if form == "torch.save":
        torch.save({"w": torch.ones(2)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    expected = "a PyTorch checkpoint (torch.save's zipped pickle)" if form == "torch.save" else "a pickle (protocol 4)"
    with pytest.raises(CheckpointError) as err:
        tensor_specs(path)
    assert str(err.value) == (f"{path}: {expected} under a .safetensors name; refused, never unpickled "
                              "(loading it could run arbitrary code): convert it to safetensors first")
