"""SDXL: the studio soups the UNet of a StableDiffusionXLPipeline (two text encoders, pooled
embeddings and size conditioning), built tiny the way diffusers' own SDXL tests build theirs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from soup_ui.engine import exports
from soup_ui.modelfiles import formats, ldm_names
from soup_ui.modelfiles.checkpoints import CheckpointError
from soup_ui.modelfiles.presets import RenderSettings, load_preset
from soup_ui.engine.studio import Studio, StudioError
from tiny import fused_lora, make_sdxl_preset

SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=0, scheduler="euler")


@pytest.fixture(scope="module")
def sdxl_preset(tmp_path_factory):
    return make_sdxl_preset(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def studio(sdxl_preset):
    return Studio(load_preset(sdxl_preset))


def test_an_sdxl_preset_loads_mixes_and_renders_from_the_same_noise(studio, sdxl_preset):
    assert type(studio.pipe).__name__ == "StableDiffusionXLPipeline" and studio.family == "sdxl"
    results = studio.render(studio.make_mix({"ink": 1, "pastel": 1}), SETTINGS)
    images = [np.asarray(r.image) for r in results]
    assert [r.label for r in results][:2] == ["ink", "pastel"] and results[-1].kind == "soup"
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    # the soup's weights are the average, and the component is the same file's weights
    ink, pastel = (load_file(str(sdxl_preset.parent / f"{n}.safetensors")) for n in ("ink", "pastel"))
    soup = studio.souped_weights(studio.make_mix({"ink": 1, "pastel": 1}))
    assert all(torch.allclose(soup[k], (ink[k] + pastel[k]) / 2, atol=1e-6) for k in soup)
    # every image of a render starts from the seed's noise: a soup of one shard is that shard's image
    alone = studio.render_soup(studio.make_mix({"ink": 1}), SETTINGS).image
    assert np.array_equal(np.asarray(alone), images[0])


def test_an_sdxl_soup_exports_as_a_single_file_diffusers_reads_back(studio, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    out = exports.single_file(studio, studio.make_mix({"ink": 1, "pastel": 2}), tmp_path / "sdxl.safetensors")
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj") for k in names)
    assert any(k.startswith("model.diffusion_model.label_emb.") for k in names)
    back = StableDiffusionXLPipeline.from_single_file(str(out), config=str(studio.preset.base))
    soup = studio.souped_weights(studio.make_mix({"ink": 1, "pastel": 2}))
    for part, expected in (("unet", soup), ("text_encoder", studio.pipe.text_encoder.state_dict()),
                           ("text_encoder_2", studio.pipe.text_encoder_2.state_dict()), ("vae", studio.pipe.vae.state_dict())):
        got = getattr(back, part).state_dict()
        assert set(got) == set(expected), part
        assert all(torch.equal(got[k].half(), v.half()) for k, v in expected.items()), part
    studio.add_shard("exported", out)  # and the file is an SDXL shard again
    try:
        assert studio.shards["exported"].weights.kind.startswith("LDM single-file checkpoint")
    finally:
        studio.remove_shard("exported")


def test_an_sdxl_pipeline_export_loads(studio, tmp_path):
    from diffusers import DiffusionPipeline

    folder = exports.pipeline_folder(studio, studio.make_mix({"ink": 1, "pastel": 1}), tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    soup = studio.souped_weights(studio.make_mix({"ink": 1, "pastel": 1}))
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in soup.items())


def test_a_shard_of_another_family_is_refused_in_one_line(studio, tiny_preset):
    with pytest.raises(CheckpointError, match="a UNet with 32-wide cross-attention; this base is a UNet with 80-wide cross-attention"):
        studio.add_shard("sd1", tiny_preset.parent / "beta.safetensors")


def test_sdxl_text_encoders_mix_from_single_files_and_pipeline_folders(studio, tmp_path):
    """Both SDXL text encoders: CLIP-L from conditioner.embedders.0 (renamed on meta tensors), OpenCLIP
    from conditioner.embedders.1 (converted with its data), or a pipeline folder's two folders."""
    import shutil

    from test_text_encoders import shifted

    pipe = studio.pipe
    own = [shifted(pipe.text_encoder.state_dict(), 31), shifted(pipe.text_encoder_2.state_dict(), 32)]
    unet = {k: v.clone() for k, v in studio.shards["ink"].tensors.items()}
    single = formats.ldm_checkpoint(unet, pipe.unet.config, pipe.vae.state_dict(), pipe.vae.config, own, "sdxl")
    save_file({k: v.contiguous().clone() for k, v in single.items()}, str(tmp_path / "xl-full.safetensors"))
    shutil.copytree(studio.preset.base, tmp_path / "xl-pipe")
    other = [shifted(pipe.text_encoder.state_dict(), 33), shifted(pipe.text_encoder_2.state_dict(), 34)]
    for component, state in zip(("text_encoder", "text_encoder_2"), other):
        module = getattr(pipe, component)
        base = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(state)
        module.save_pretrained(tmp_path / "xl-pipe" / component)
        module.load_state_dict(base)
    studio.add_shard("full", tmp_path / "xl-full.safetensors")
    studio.add_shard("folder", tmp_path / "xl-pipe")
    try:
        assert studio.shards["full"].weights.text_kind == "the CLIP and OpenCLIP text encoders of an LDM single file"
        assert studio.shards["folder"].weights.text_kind == "the pipeline folder's text_encoder/, text_encoder_2/"
        result = studio.render_soup(studio.make_mix({"full": 1, "folder": 1, "pastel": 2}, text_encoders=True), SETTINGS.model_copy(update={"seed": 41}))
        assert result.label.endswith("text encoders mixed")
        for component, a, b in zip(("text_encoder", "text_encoder_2"), own, other):
            base = studio.mixer.base_text
            got = getattr(pipe, component).state_dict()
            for k, v in got.items():
                if k.endswith("position_ids"):
                    continue
                expected = 0.25 * a[k] + 0.25 * b[k] + 0.5 * base[f"{component}.{k}"]
                assert torch.allclose(v, expected, atol=1e-6), (component, k)
    finally:
        studio.render_soup(studio.make_mix({"ink": 1}), SETTINGS.model_copy(update={"seed": 42}))  # back to the base's text encoders
        studio.remove_shard("full")
        studio.remove_shard("folder")


def test_an_unsupported_pipeline_class_is_named(tmp_path, sdxl_preset):
    import shutil

    import yaml

    shutil.copytree(sdxl_preset.parent / "base", tmp_path / "base")
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    (tmp_path / "base" / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    data = yaml.safe_load(sdxl_preset.read_text())
    data["base"] = str(tmp_path / "base")
    data["shards"] = [{**s, "path": str(sdxl_preset.parent / s["path"])} for s in data["shards"]]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(StudioError, match=r"a KandinskyPipeline, which the studio does not soup; it soups StableDiffusionPipeline \(SD 1.x / 2.x\), "
                       r"StableDiffusionXLPipeline \(SDXL\), StableDiffusion3Pipeline \(SD3 / 3.5\), FluxPipeline \(FLUX.1\)$"):
        Studio(load_preset(tmp_path / "p.yaml"))


@pytest.mark.parametrize("naming", ["peft", "kohya-sgm"])
def test_an_sdxl_lora_soups_like_the_lora_fused_first(studio, tmp_path, naming):
    """SDXL LoRAs: peft naming, and kohya's SDXL naming, which names blocks as the original model
    does (lora_unet_input_blocks_4_1_..., with .alpha)."""
    from test_formats import peft_lora

    state = peft_lora(studio, seed=5)
    if naming == "peft":
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, safe_serialization=True)
        lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    else:
        ldm = ldm_names.ldm_unet_names(list(studio.base_specs), studio.hybrid.config)
        kohya = {}
        for key, value in state.items():
            module, part = key.rsplit(".lora_", 1)
            stem = "lora_unet_" + ldm[module + ".weight"].removesuffix(".weight").replace(".", "_")
            kohya[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
            kohya[f"{stem}.alpha"] = torch.tensor(4.0)
        assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
        lora_file = tmp_path / "kohya-sdxl.safetensors"
        save_file(kohya, str(lora_file))
    fused = fused_lora(studio.preset.base, lora_file)
    shard = studio.add_shard("lora", lora_file)
    try:
        assert shard.weights.lora and shard.weights.unet is None
        studio.mix(studio.make_mix({"lora": 1}))
        base = dict(studio.base_tensors)
        assert any(not torch.equal(fused[k], base[k]) for k in base)
        for k in base:
            torch.testing.assert_close(studio.hybrid_tensors[k], fused[k], rtol=0, atol=1e-6)
    finally:
        studio.remove_shard("lora")


def test_the_memory_plan_says_what_was_chosen_and_why(studio, sdxl_preset):
    from soup_ui.engine.studio import RuntimeOptions

    assert studio.memory_plan.startswith("2 shards of 1 MB held in memory: 0.0 GB (shards 0.0 GB, a shard being loaded 0.0 GB) fit in 80% of the ")
    lean = Studio(load_preset(sdxl_preset), RuntimeOptions(lean=True))
    assert lean.memory_plan.endswith("streamed from their files (lean): as asked (--lean)")
