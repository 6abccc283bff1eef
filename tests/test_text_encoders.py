""""Mix text encoders too": full single files and pipeline folders carry their own (often finetuned)
text encoder; with the option on they are souped with the mix's weights, a shard without one counting
as the base's; integer buffers are never averaged; off (the paper's default), the base's is used."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from soup_ui.engine import exports
from soup_ui.modelfiles import formats
from soup_ui.cli import main as cli_main
from soup_ui.modelfiles.presets import RenderSettings, load_preset, load_recipe
from soup_ui.engine.studio import Studio

SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=0)


def shifted(tensors, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def shards(tiny_preset, tmp_path_factory):
    """A full LDM single file and a pipeline folder, each with its own finetuned text encoder; and
    the preset extended with both."""
    folder = tmp_path_factory.mktemp("text")
    studio = Studio(load_preset(tiny_preset))
    pipe = studio.pipe
    unet = load_file(str(tiny_preset.parent / "beta.safetensors"))
    text_a = shifted(pipe.text_encoder.state_dict(), 1)
    single = formats.ldm_checkpoint(unet, pipe.unet.config, pipe.vae.state_dict(), pipe.vae.config, [text_a], "sd1")
    # Some checkpoints store position_ids, as floats even: averaging them is a known merger bug.
    single["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16, dtype=torch.float32)[None] + 0.3
    save_file({k: v.contiguous().clone() for k, v in single.items()}, str(folder / "full.safetensors"))
    text_b = shifted(pipe.text_encoder.state_dict(), 2)
    shutil.copytree(studio.preset.base, folder / "pipeline")
    pipe.text_encoder.load_state_dict(text_b)
    pipe.text_encoder.save_pretrained(folder / "pipeline" / "text_encoder")
    data = yaml.safe_load(tiny_preset.read_text())
    data["base"] = str(tiny_preset.parent / data["base"])
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    data["shards"] += [{"name": "full", "path": str(folder / "full.safetensors")}, {"name": "pipe", "path": str(folder / "pipeline")}]
    (folder / "text.yaml").write_text(yaml.safe_dump(data))
    return folder, text_a, text_b


@pytest.fixture(scope="module")
def studio(shards):
    return Studio(load_preset(shards[0] / "text.yaml"))


def text_state(studio):
    return {k: v.detach().clone() for k, v in studio.pipe.text_encoder.state_dict().items()}


def test_shards_with_their_own_text_encoder_are_found(studio):
    assert studio.shards["full"].weights.text_kind == "the CLIP text encoder of an LDM single file"
    assert studio.shards["pipe"].weights.text_kind == "the pipeline folder's text_encoder/"
    assert studio.shards["alpha"].text_sha is None and studio.shards["beta"].text_sha is None  # UNet-only shards


def test_text_encoders_are_souped_with_the_mix_weights_and_a_shard_without_counts_as_the_base(studio, shards):
    _, text_a, text_b = shards
    studio.render_soup(studio.make_mix({"full": 1, "pipe": 1}), SETTINGS.model_copy(update={"seed": 5}))  # renders with the base's text encoder
    base = text_state(studio)
    studio.render_soup(studio.make_mix({"full": 1, "pipe": 1, "beta": 2}, text_encoders=True), SETTINGS)
    mixed = text_state(studio)
    for k, v in base.items():
        if k.endswith("position_ids"):
            assert torch.equal(mixed[k], v) and mixed[k].dtype == torch.int64  # copied, never averaged
            continue
        expected = 0.25 * text_a[k].float() + 0.25 * text_b[k].float() + 0.5 * v.float()
        assert torch.allclose(mixed[k], expected, atol=1e-6), k
    studio.render_soup(studio.make_mix({"full": 1, "pipe": 1}), SETTINGS.model_copy(update={"seed": 3}))  # off (the default): the base's text encoder
    assert all(torch.equal(text_state(studio)[k], v) for k, v in base.items())
    # Block weights (issue 20): BASE weighs the text encoders, normalized like a block; all 0 there: the base's.
    studio.render_soup(studio.make_mix({"full": 1, "pipe": 1}, text_encoders=True, blocks={"full": "BASE:3"}), SETTINGS)
    mixed = text_state(studio)
    for k, v in base.items():
        if not k.endswith("position_ids"):
            assert torch.allclose(mixed[k], 0.75 * text_a[k].float() + 0.25 * text_b[k].float(), atol=1e-6), k
    zero = studio.make_mix({"full": 1, "pipe": 1}, text_encoders=True, blocks={"full": "BASE:0", "pipe": "BASE:0"})
    assert zero.text_key is None and "BASE" in zero.base_blocks
    studio.render_soup(zero, SETTINGS)
    assert all(torch.equal(text_state(studio)[k], v) for k, v in base.items())


def test_add_difference_text_encoders_take_b_s_base_multiplier(studio, shards):
    """Issue 33, defect 4: with add-difference, B's block weights scale alpha per block; the text
    encoders ignored B's BASE multiplier (alpha stayed whole there) and kept the cache key of the
    mix without it."""
    _, text_a, text_b = shards
    studio.render_soup(studio.make_mix({"full": 1}), SETTINGS.model_copy(update={"seed": 6}))
    base = text_state(studio)
    args = dict(method="add-difference", params={"alpha": 1.0, "c": "base"}, text_encoders=True)
    whole = studio.make_mix({"full": 1, "pipe": 1}, **args)
    half = studio.make_mix({"full": 1, "pipe": 1}, **args, blocks={"pipe": "BASE:0.5"})
    assert half.text_key != whole.text_key
    studio.render_soup(half, SETTINGS)
    mixed = text_state(studio)
    k = "encoder.layers.0.self_attn.q_proj.weight"  # A + 0.5 (B - base)
    assert torch.allclose(mixed[k], text_a[k] + 0.5 * (text_b[k] - base[k]), atol=1e-5)


def test_the_option_changes_the_images_and_the_caches_keep_them_apart(studio):
    mix = {"full": 1, "pipe": 1}
    off = np.asarray(studio.render_soup(studio.make_mix(mix), SETTINGS).image)
    on = studio.render_soup(studio.make_mix(mix, text_encoders=True), SETTINGS)
    assert on.label.endswith(", text encoders mixed")
    assert not np.array_equal(off, np.asarray(on.image))
    fresh = SETTINGS.model_copy(update={"seed": 7})  # not cached: the prompt embeddings must be the base's again
    a = np.asarray(studio.render_soup(studio.make_mix(mix), fresh).image)
    studio.renderer.images.clear()
    studio.renderer.embeddings_cache.clear()
    assert np.array_equal(a, np.asarray(studio.render_soup(studio.make_mix(mix), fresh).image))
    # UNet-only shards have no text encoder of their own: the option changes nothing for them
    plain = {"alpha": 1, "beta": 1}
    assert np.array_equal(np.asarray(studio.render_soup(studio.make_mix(plain), SETTINGS).image), np.asarray(studio.render_soup(studio.make_mix(plain, text_encoders=True), SETTINGS).image))
    assert studio.make_mix(plain, text_encoders=True).text_key is None


def test_a_component_renders_with_its_own_text_encoder(studio):
    own = studio.render_component(studio.shards["full"], SETTINGS, text_encoders=True).image
    base = studio.render_component(studio.shards["full"], SETTINGS).image
    assert not np.array_equal(np.asarray(own), np.asarray(base))
    alone = studio.render_soup(studio.make_mix({"full": 1}, text_encoders=True), SETTINGS).image
    assert np.array_equal(np.asarray(own), np.asarray(alone))


def test_task_arithmetic_applies_to_text_encoders_too(studio, shards):
    _, text_a, _ = shards
    studio.render_soup(studio.make_mix({"full": 1}), SETTINGS.model_copy(update={"seed": 4}))  # renders with the base's text encoder
    base = text_state(studio)
    studio.render_soup(studio.make_mix({"full": 1}, method="task-arithmetic", params={"lambda": 1.5}, text_encoders=True), SETTINGS)
    mixed = text_state(studio)
    k = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(mixed[k], base[k] + 1.5 * (text_a[k] - base[k]), atol=1e-5)
    studio.render_soup(studio.make_mix({"full": 1}), SETTINGS)


def test_exports_carry_the_mixed_text_encoder(studio, tmp_path):
    from diffusers import StableDiffusionPipeline

    mix = {"full": 1, "pipe": 1}
    studio.render_soup(studio.make_mix(mix, text_encoders=True), SETTINGS)
    mixed = text_state(studio)
    out = exports.single_file(studio, studio.make_mix(mix, text_encoders=True), tmp_path / "soup.safetensors")
    back = StableDiffusionPipeline.from_single_file(str(out), config=str(studio.preset.base), safety_checker=None, requires_safety_checker=False)
    got = back.text_encoder.state_dict()
    assert all(torch.equal(got[k].half(), v.half()) for k, v in mixed.items() if v.is_floating_point())
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["soup_ui.recipe"])["text_encoders"] is True
    folder = exports.pipeline_folder(studio, studio.make_mix(mix, text_encoders=True), tmp_path / "pipeline")
    loaded = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert all(torch.equal(loaded.text_encoder.state_dict()[k], v) for k, v in mixed.items())
    recipe = json.loads((folder / "soup_recipe.json").read_text())
    assert recipe["text_encoders"] is True and all("text_encoder_sha256" in s for s in recipe["shards"])
    plain = exports.pipeline_folder(studio, studio.make_mix(mix), tmp_path / "plain")  # off: the base's text encoder, byte for byte
    base_te = studio.preset.base / "text_encoder" / "model.safetensors"
    assert (plain / "text_encoder" / "model.safetensors").read_bytes() == base_te.read_bytes()


def test_a_broken_text_encoder_leaves_the_denoiser_usable(studio, shards, tmp_path, caplog):
    folder = shards[0]
    tensors = load_file(str(folder / "full.safetensors"))
    del tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with caplog.at_level("WARNING"):
        shard = studio.add_shard("broken", tmp_path / "broken.safetensors")
    try:
        assert shard.text_sha is None
        assert any("its text encoder is not used" in r.getMessage() and "final_layer_norm.weight" in r.getMessage() for r in caplog.records)
    finally:
        studio.remove_shard("broken")


def test_a_pickled_text_encoder_is_refused_saying_why(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(Exception, match="stored only as a pickle .*pytorch_model.bin.*arbitrary code"):
        formats.text_encoder_files(tmp_path / "text_encoder")


def test_cli_flag_and_recipe_field(shards, tmp_path):
    folder = shards[0]
    preset = str(folder / "text.yaml")
    assert cli_main(["render", "--preset", preset, "--mix", "full=1,pipe=1", "--mix-text-encoders", "--steps", "2",
                     "--out", str(tmp_path / "on.png"), "--save-recipe", str(tmp_path / "r.yaml")]) == 0
    assert load_recipe(tmp_path / "r.yaml").text_encoders is True
    assert cli_main(["export", "--recipe", str(tmp_path / "r.yaml"), "--format", "diffusers", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "soup_recipe.json").read_text())["text_encoders"] is True
    assert cli_main(["export", "--recipe", str(tmp_path / "r.yaml"), "--no-mix-text-encoders", "--format", "diffusers", "--out", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "soup_recipe.json").read_text())["text_encoders"] is False


@pytest.fixture(scope="module")
def sd2_like(tiny_preset, tmp_path_factory):
    """The tiny pipeline with an OpenCLIP-style text encoder (gelu, as SD 2.x's): a preset on it."""
    folder = tmp_path_factory.mktemp("sd2like")
    base = folder / "base"
    shutil.copytree(tiny_preset.parent / "base", base)
    config = json.loads((base / "text_encoder" / "config.json").read_text())
    (base / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    data = yaml.safe_load(tiny_preset.read_text())
    data["base"] = str(base)
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    (folder / "sd2.yaml").write_text(yaml.safe_dump(data))
    return Studio(load_preset(folder / "sd2.yaml"))


def open_clip_names(layers: int, prefix: str = "cond_stage_model.model.") -> set[str]:
    """Every tensor name of an OpenCLIP text tower with `layers` residual blocks, as SD 2.x single
    files carry it (what ComfyUI's SD 2.x CLIP loader, 24 blocks for ViT-H, reads without warnings)."""
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    names = {f"transformer.resblocks.{i}.{n}" for i in range(layers) for n in block}
    names |= {"positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias", "text_projection", "logit_scale"}
    return {prefix + n for n in names}


def test_an_sd2_export_writes_open_clip_names_that_diffusers_reads_back(sd2_like, tmp_path):
    """SD 2.x single files keep OpenCLIP's layout (resblocks, q/k/v in one in_proj) and all of it:
    the last block, the projection and the logit scale that diffusers drops (ComfyUI warned "clip
    missing: clip_h.logit_scale, text_projection.weight" and the 16 tensors of layers.23). From a
    diffusers base they are neutral (a zero block is the identity); diffusers' from_single_file gives
    every text-encoder tensor back."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out = exports.single_file(sd2_like, sd2_like.make_mix({"alpha": 1, "beta": 1}), tmp_path / "sd2.safetensors")
    layers = sd2_like.pipe.text_encoder.config.num_hidden_layers
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
        meta = f.metadata()
        last = {k: f.get_tensor(k) for k in names if f".resblocks.{layers}." in k}
        projection, scale = f.get_tensor("cond_stage_model.model.text_projection"), f.get_tensor("cond_stage_model.model.logit_scale")
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == ("stable-diffusion-v2-512", "epsilon")
    assert {k for k in names if k.startswith("cond_stage_model.")} == open_clip_names(layers + 1)
    assert len(last) == 12 and all(not t.any() for t in last.values())
    assert torch.equal(projection.float(), torch.eye(projection.shape[0])) and abs(float(scale) - math.log(100)) < 1e-2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in names)
    scheduler = sd2_like.pipe.scheduler
    scheduler.register_to_config(prediction_type="v_prediction")  # as SD 2.x-768-v's
    try:
        assert exports.architecture(sd2_like)["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    finally:
        scheduler.register_to_config(prediction_type="epsilon")
    back = StableDiffusionPipeline.from_single_file(str(out), config=str(sd2_like.preset.base), safety_checker=None, requires_safety_checker=False)
    expected = sd2_like.pipe.text_encoder.state_dict()
    got = back.text_encoder.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k].half(), v.half()) for k, v in expected.items())


def test_an_sd2_export_from_a_single_file_base_copies_its_unused_open_clip_parts(sd2_like, tmp_path):
    """A base that is an SD 2.x single file has OpenCLIP's last block, projection and logit scale:
    the export carries them as the base file has them, bit for bit."""
    pipe = sd2_like.pipe
    single = formats.ldm_checkpoint(dict(sd2_like.base_tensors), pipe.unet.config, pipe.vae.state_dict(), pipe.vae.config,
                                    [pipe.text_encoder.state_dict()], "sd2")
    torch.manual_seed(2)
    layers = pipe.text_encoder.config.num_hidden_layers
    real = {k: torch.randn_like(v) for k, v in single.items() if f".resblocks.{layers}." in k or k.endswith(("text_projection", "logit_scale"))}
    assert len(real) == 14
    save_file({**{k: v.contiguous().clone() for k, v in single.items()}, **real}, str(tmp_path / "base.safetensors"))
    data = yaml.safe_load((Path(sd2_like.preset.base).parent / "sd2.yaml").read_text())  # the fixture's preset
    data["base"], data["config"] = str(tmp_path / "base.safetensors"), str(sd2_like.preset.base)
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(data))
    other = Studio(load_preset(tmp_path / "single.yaml"))
    out = exports.single_file(other, other.make_mix({"alpha": 1}), tmp_path / "soup.safetensors")
    exported = load_file(str(out))
    assert {k for k in exported if k.startswith("cond_stage_model.")} == open_clip_names(layers + 1)
    assert all(torch.equal(exported[k], v.half()) for k, v in real.items())


def test_an_sd2_single_file_text_encoder_mixes(sd2_like, tmp_path):
    pipe = sd2_like.pipe
    own = shifted(pipe.text_encoder.state_dict(), 11)
    unet = {k: v.clone() for k, v in sd2_like.shards["gamma"].tensors.items()}
    single = formats.ldm_checkpoint(unet, pipe.unet.config, pipe.vae.state_dict(), pipe.vae.config, [own], "sd2")
    save_file({k: v.contiguous().clone() for k, v in single.items()}, str(tmp_path / "sd2-full.safetensors"))
    shard = sd2_like.add_shard("sd2full", tmp_path / "sd2-full.safetensors")
    try:
        assert shard.weights.text_kind == "the OpenCLIP text encoder of an LDM single file"
        sd2_like.render_soup(sd2_like.make_mix({"sd2full": 1}, text_encoders=True), SETTINGS.model_copy(update={"seed": 21}))
        mixed = text_state(sd2_like)
        assert all(torch.equal(mixed[k], v) for k, v in own.items())
    finally:
        sd2_like.remove_shard("sd2full")


def test_sdxl_text_encoders_take_both_original_layouts():
    """SDXL: CLIP-L under conditioner.embedders.0.transformer, OpenCLIP-bigG (with its projection)
    under conditioner.embedders.1.model; diffusers' converters take both back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**small)).state_dict()
    big = CLIPTextModelWithProjection(CLIPTextConfig(**small, hidden_act="gelu", projection_dim=16)).state_dict()
    out = {}
    for state, (naming, prefix) in zip((clip, big), formats.TEXT_PREFIXES["sdxl"]):
        out.update(formats.ldm_open_clip_tensors(state, prefix) if naming == "open_clip" else {})
    assert out["conditioner.embedders.1.model.text_projection"].shape == (16, 16)
    assert torch.equal(out["conditioner.embedders.1.model.text_projection"], big["text_projection.weight"].T)
    texts = {"conditioner.embedders.0.transformer.text_model." + k: v for k, v in clip.items()}
    back = convert_ldm_clip_checkpoint(texts, "conditioner.embedders.0.transformer.")
    assert {k.removeprefix("text_model.") for k in back} == set(clip)
