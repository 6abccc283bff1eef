"""Checkpoints as users own them: single-file LDM (A1111/civitai), variants, pipeline folders, any
float dtype, LoRA in diffusers/peft and kohya naming; each equals its diffusers form in the soup."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from soup_ui.engine import exports
from soup_ui.modelfiles import formats, ldm_names
from soup_ui.modelfiles.checkpoints import CheckpointError
from soup_ui.modelfiles.presets import RenderSettings, load_preset
from soup_ui.engine.studio import Studio

SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=0)


@pytest.fixture(scope="module")
def studio(tiny_preset):
    return Studio(load_preset(tiny_preset))


def base_unet_dir(studio):
    return studio.preset.base / "unet"


def diffusers_weights(tiny_preset):
    return load_file(str(tiny_preset.parent / "beta.safetensors"))


def to_ldm(weights, config, prefix=formats.LDM_PREFIX):
    names = ldm_names.ldm_unet_names(list(weights), config)
    return {prefix + names[k]: v for k, v in weights.items()}


def hybrid_after(studio, mix):
    studio.mix(studio.make_mix(mix))
    return {k: v.clone() for k, v in studio.hybrid_tensors.items()}


def test_the_ldm_export_names_round_trip_through_diffusers_from_single_file(tmp_path, tiny_preset, studio):
    from diffusers import UNet2DConditionModel

    weights = diffusers_weights(tiny_preset)
    save_file(to_ldm(weights, studio.hybrid.config), str(tmp_path / "ldm.safetensors"))
    unet = UNet2DConditionModel.from_single_file(str(tmp_path / "ldm.safetensors"), config=str(base_unet_dir(studio).parent), subfolder="unet")
    back = unet.state_dict()
    assert set(back) == set(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


@pytest.mark.parametrize("form", ["unet-only", "full", "bare"])
def test_a_single_file_checkpoint_soups_exactly_like_its_diffusers_form(tmp_path, tiny_preset, studio, form, caplog):
    weights = diffusers_weights(tiny_preset)
    ldm = to_ldm(weights, studio.hybrid.config, prefix="" if form == "bare" else formats.LDM_PREFIX)
    if form == "full":  # what A1111 saves: VAE, text encoder, an EMA copy and the schedule too
        ldm.update({"first_stage_model.decoder.conv_in.weight": torch.ones(2, 2), "cond_stage_model.transformer.x": torch.ones(3),
                    "model_ema.decay": torch.tensor(0.999), "betas": torch.ones(1000), "alphas_cumprod": torch.ones(1000)})
    save_file({k: v.to(torch.bfloat16) if form == "full" else v for k, v in ldm.items()}, str(tmp_path / f"{form}.safetensors"))
    found = formats.detect(tmp_path / f"{form}.safetensors", studio.hybrid.config, studio.base_specs)
    assert found.kind.startswith("LDM single-file checkpoint")
    if form == "full":
        assert found.kind == "LDM single-file checkpoint (full: VAE, text encoder too)"
        assert found.ignored == {"VAE": 1, "text encoder": 1, "EMA copy": 1, "other tensors (scheduler buffers...)": 2}
    name = f"ldm-{form}"
    with caplog.at_level("INFO"):
        studio.add_shard(name, tmp_path / f"{form}.safetensors")
    try:
        if form == "full":
            line = next(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
            assert all(part in line for part in ("1 VAE", "1 text encoder", "1 EMA copy", "2 other tensors (scheduler buffers...)"))
        converted = hybrid_after(studio, {name: 1, "gamma": 1})
        expected_source = {k: v.to(torch.bfloat16).float() for k, v in weights.items()} if form == "full" else weights
        save_file(expected_source, str(tmp_path / "same.safetensors"))
        studio.add_shard(f"{name}-diffusers", tmp_path / "same.safetensors")
        reference = hybrid_after(studio, {f"{name}-diffusers": 1, "gamma": 1})
        assert all(torch.equal(converted[k], reference[k]) for k in reference)
        studio.remove_shard(f"{name}-diffusers")
    finally:
        studio.remove_shard(name)


def test_variant_and_pipeline_folders_load_as_shards(tmp_path, tiny_preset, studio):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_unet_dir(studio))
    unet.load_state_dict(diffusers_weights(tiny_preset))
    shutil.copytree(studio.preset.base, tmp_path / "pipeline", ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(tmp_path / "pipeline" / "unet")
    unet.half().save_pretrained(tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for name, path, kind in (("variant", "variant", "diffusers UNet (fp16 variant)"), ("pipe", "pipeline", "diffusers UNet (a pipeline folder's unet/)")):
        shard = studio.add_shard(name, tmp_path / path)
        assert shard.weights.kind == kind
    try:
        full = hybrid_after(studio, {"pipe": 1})
        assert all(torch.equal(full[k], v) for k, v in diffusers_weights(tiny_preset).items())
        half = hybrid_after(studio, {"variant": 1})
        assert all(torch.equal(half[k], v.half().float()) for k, v in diffusers_weights(tiny_preset).items())
    finally:
        studio.remove_shard("variant")
        studio.remove_shard("pipe")


def peft_lora(studio, seed, rank=2, alpha=4):
    """A LoRA made with peft on the base UNet (random B, so that it changes something), as diffusers saves it."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_unet_dir(studio))
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return get_peft_model_state_dict(unet)


def save_diffusers_lora(studio, folder, seed):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=peft_lora(studio, seed), safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def save_kohya_lora(studio, file, seed, rank=2, alpha=4):
    """The same kind of LoRA in kohya's naming: lora_unet_<module_with_underscores>.lora_down/up, .alpha."""
    state = peft_lora(studio, seed, rank, alpha)
    kohya = {}
    for key, value in state.items():
        module, part = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(kohya, str(file))
    return file


def fused_weights(studio, lora_file):
    """What diffusers itself makes of the LoRA: load_lora_weights + fuse_lora on the base pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(studio.preset.base, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("naming", ["diffusers", "kohya"])
def test_a_lora_shard_soups_like_the_lora_fused_first(tmp_path, tiny_preset, studio, naming):
    lora_file = save_diffusers_lora(studio, tmp_path, 7) if naming == "diffusers" else save_kohya_lora(studio, tmp_path / "kohya.safetensors", 7)
    fused = fused_weights(studio, lora_file)
    if naming == "diffusers":
        lora_file = tmp_path  # the folder save_lora_weights wrote: a shard too
    base = {k: v.clone() for k, v in studio.base_tensors.items()}
    assert any(not torch.equal(fused[k], base[k]) for k in base)  # the LoRA changes something
    shard = studio.add_shard("lora", lora_file)
    try:
        assert shard.weights.kind == ("diffusers/peft LoRA" if naming == "diffusers" else "kohya LoRA")
        adapted = [k for k in base if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))]
        assert shard.weights.unet is None and sorted(shard.weights.lora) == sorted(adapted)  # kept low rank, no full UNet
        alone = hybrid_after(studio, {"lora": 1})
        for k in base:
            torch.testing.assert_close(alone[k], fused[k], rtol=0, atol=1e-6)
        # A soup of a LoRA and a full shard equals the soup of the fused LoRA and that shard.
        mixed = hybrid_after(studio, {"lora": 1, "gamma": 3})
        gamma = {k: v.clone() for k, v in studio.shards["gamma"].tensors.items()}
        for k in base:
            torch.testing.assert_close(mixed[k], 0.25 * fused[k] + 0.75 * gamma[k], rtol=0, atol=1e-6)
        # With block weights (issue 20), per block: the LoRA's delta takes its block's coefficient.
        studio.mix(studio.make_mix({"lora": 1, "gamma": 3}, blocks={"lora": "OUT:0,M:3"}))
        for k in base:
            block = studio.blocks.of[k]
            w = 0.0 if block.startswith("OUT") else 0.5 if block == "M00" else 0.25  # M00: 0.75 / (0.75 + 0.75)
            torch.testing.assert_close(studio.hybrid_tensors[k], w * fused[k] + (1 - w) * gamma[k], rtol=0, atol=1e-6)
        # Task arithmetic: base + scale * w * delta.
        studio.mix(studio.make_mix({"lora": 1}, method="task-arithmetic", params={"lambda": 2.0}))
        for k in base:
            torch.testing.assert_close(studio.hybrid_tensors[k], base[k] + 2 * (fused[k] - base[k]), rtol=0, atol=1e-5)
        image = studio.render_soup(studio.make_mix({"lora": 1, "gamma": 1}), SETTINGS).image
        assert image.size == (16, 16)
    finally:
        studio.remove_shard("lora")


def test_lycoris_foreign_and_pickle_files_are_refused_naming_what_they_are(tmp_path, studio):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(2, 2)}, str(tmp_path / "loha.safetensors"))
    save_file({"encoder.layer.0.weight": torch.ones(2)}, str(tmp_path / "bert.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    cases = {
        "loha.safetensors": "a LyCORIS LoHa network (hada_w1 tensors); LoRA and DoRA (diffusers, peft, kohya or LyCORIS naming) and LyCORIS full networks are supported",
        "bert.safetensors": "not a checkpoint this studio reads: none of its 1 tensors is a UNet weight in diffusers or LDM naming, nor a LoRA (first names: encoder.layer.0.weight)",
        "model.ckpt": "refused: .ckpt is a pickle checkpoint",
    }
    for file, message in cases.items():
        with pytest.raises(CheckpointError, match=None) as err:
            studio.add_shard(file, tmp_path / file)
        assert message in str(err.value)
    assert not any(n.endswith((".safetensors", ".ckpt")) for n in studio.shards)


def test_a_lora_for_another_architecture_is_refused_with_both_shapes(tmp_path, studio):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.ones(2, 640), f"{key}.lora_up.weight": torch.ones(640, 2), f"{key}.alpha": torch.tensor(2.0)},
              str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match=r"kohya LoRA for another architecture: its down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q is 640x640, this base's is \[16, 16\]"):
        studio.add_shard("wide", tmp_path / "wide.safetensors")


def test_a_single_file_shard_streams_in_lean_mode(tmp_path, tiny_preset):
    from soup_ui.engine.studio import RuntimeOptions

    lean = Studio(load_preset(tiny_preset), RuntimeOptions(lean=True))
    weights = diffusers_weights(tiny_preset)
    save_file(to_ldm(weights, lean.hybrid.config), str(tmp_path / "ldm.safetensors"))
    lean.add_shard("ldm", tmp_path / "ldm.safetensors")
    a = np.asarray(lean.render_soup(lean.make_mix({"ldm": 1}), SETTINGS).image)
    b = np.asarray(lean.render_soup(lean.make_mix({"beta": 1}), SETTINGS).image)
    assert np.array_equal(a, b)
    assert json.loads(json.dumps(lean.make_mix({"ldm": 1}).recipe()))["shards"][0]["name"] == "ldm"


def test_the_single_file_export_loads_in_diffusers_and_back_as_a_shard(tmp_path, studio):
    """The export other tools load, proven through diffusers' own from_single_file: every tensor of
    UNet, VAE and text encoder comes back exactly (as fp16); the file is also a shard again."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out = exports.single_file(studio, studio.make_mix({"alpha": 1, "gamma": 1}), tmp_path / "soup.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")) for k in f.keys())
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads(meta["soup_ui.recipe"])["label"] == meta["modelspec.title"] == "soup: 0.50 alpha + 0.50 gamma"
    recipe = json.loads(meta["sd_merge_recipe"])
    assert (recipe["type"], recipe["interp_method"], recipe["multiplier"], recipe["save_as_half"]) == ("webui", "Weighted sum", 0.5, True)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and len(json.loads(meta["sd_merge_models"])) == 2
    back = StableDiffusionPipeline.from_single_file(str(out), config=str(studio.preset.base), safety_checker=None, requires_safety_checker=False)
    soup = studio.souped_weights(studio.make_mix({"alpha": 1, "gamma": 1}))
    expected = {"unet": soup, "vae": studio.pipe.vae.state_dict(), "text_encoder": studio.pipe.text_encoder.state_dict()}
    for part, tensors in expected.items():
        got = getattr(back, part).state_dict()
        assert set(got) == set(tensors), part
        for k, v in tensors.items():
            assert torch.equal(got[k].half(), v.half()), (part, k)
    studio.add_shard("exported", out)
    try:
        assert studio.shards["exported"].weights.kind == "LDM single-file checkpoint (full: VAE, text encoder too)"
        again = hybrid_after(studio, {"exported": 1})
        assert all(torch.equal(again[k], soup[k].half().float()) for k in soup)
    finally:
        studio.remove_shard("exported")


def test_a_single_file_base_with_a_config_folder_renders_like_the_folder(tmp_path, tiny_preset, studio):
    """A preset whose base is an A1111-style file (configs and tokenizer from `config:`) gives the
    same images as the same pipeline as a diffusers folder, and exports a loadable pipeline."""
    import yaml
    from diffusers import StableDiffusionPipeline

    pipe = studio.pipe
    single = formats.ldm_checkpoint(dict(studio.base_tensors), pipe.unet.config, pipe.vae.state_dict(),
                                    pipe.vae.config, [pipe.text_encoder.state_dict()], "sd1")
    save_file({k: v.contiguous().clone() for k, v in single.items()}, str(tmp_path / "base.safetensors"))
    data = yaml.safe_load(tiny_preset.read_text())
    data["base"], data["config"] = str(tmp_path / "base.safetensors"), str(studio.preset.base)
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(data))
    other = Studio(load_preset(tmp_path / "single.yaml"))
    assert other.base_found.kind == "LDM single-file checkpoint (full: VAE, text encoder too)"
    for mix in ({"alpha": 1}, {"alpha": 1, "gamma": 2}):
        a, b = studio.render_soup(studio.make_mix(mix), SETTINGS).image, other.render_soup(other.make_mix(mix), SETTINGS).image
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other.mix(other.make_mix({"alpha": 1}, method="task-arithmetic", params={"lambda": 1.5}))  # uses the base's own tensors, read through the name map
    studio.mix(studio.make_mix({"alpha": 1}, method="task-arithmetic", params={"lambda": 1.5}))
    assert all(torch.equal(other.hybrid_tensors[k], studio.hybrid_tensors[k]) for k in studio.base_specs)
    out = exports.pipeline_folder(other, other.make_mix({"alpha": 1, "beta": 1}), tmp_path / "exported")
    loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    soup = studio.souped_weights(studio.make_mix({"alpha": 1, "beta": 1}))
    assert all(torch.equal(loaded.unet.state_dict()[k], soup[k]) for k in soup)
    data["config"] = None
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="32-wide cross-attention; give `config:` naming a diffusers pipeline folder"):
        load_preset(tmp_path / "bad.yaml")


@pytest.mark.parametrize("naming", ["kohya", "ldm"])
def test_a_checkpoint_of_another_family_is_named(tmp_path, studio, naming):
    """An SDXL LoRA or an SD 2.x single file on this base: the message names both families."""
    if naming == "kohya":
        key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
        tensors = {f"{key}.lora_down.weight": torch.ones(4, 2048), f"{key}.lora_up.weight": torch.ones(640, 4), f"{key}.alpha": torch.tensor(4.0)}
        expected = "xl.safetensors: a kohya LoRA for SDXL (2048-wide cross-attention); this base is a UNet with 32-wide cross-attention"
    else:
        tensors = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(320, 1024)}
        expected = "xl.safetensors: an LDM single-file checkpoint for SD 2.x (1024-wide cross-attention); this base is a UNet with 32-wide"
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError) as err:
        studio.add_shard("xl", tmp_path / "xl.safetensors")
    assert expected in str(err.value)


def test_a_hub_id_base_resolves_from_the_local_cache_only(tmp_path, tiny_preset, studio, monkeypatch):
    import huggingface_hub.constants
    import yaml

    from soup_ui.modelfiles.presets import PresetError

    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-sd" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(studio.preset.base, snapshot)
    (hub / "models--someone--tiny-sd" / "refs").mkdir()
    (hub / "models--someone--tiny-sd" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    data = yaml.safe_load(tiny_preset.read_text())
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    for repo, ok in (("someone/tiny-sd", True), ("someone/not-downloaded", False)):
        data["base"] = repo
        (tmp_path / "hub.yaml").write_text(yaml.safe_dump(data))
        if ok:
            assert load_preset(tmp_path / "hub.yaml").base == snapshot
        else:
            with pytest.raises(PresetError) as err:
                load_preset(tmp_path / "hub.yaml")
            message = str(err.value)
            assert "'someone/not-downloaded' is not a folder here nor in the local Hugging Face cache" in message
            assert "hf download someone/not-downloaded" in message and len(message.splitlines()) == 1


def test_a_lora_soup_in_fp16_is_summed_in_fp32_and_rounded_once(tmp_path, tiny_preset):
    from soup_ui.engine.studio import RuntimeOptions

    half = Studio(load_preset(tiny_preset), RuntimeOptions(dtype="float16"))
    lora_file = save_kohya_lora(half, tmp_path / "k.safetensors", seed=11)
    half.add_shard("lora", lora_file)
    half.mix(half.make_mix({"lora": 1, "gamma": 3}))
    lora = half.shards["lora"].weights.lora
    for key, low in lora.items():
        base, gamma = half.base_tensors[key].float(), half.shards["gamma"].tensors[key].float()
        expected = (0.25 * base + 0.75 * gamma + 0.25 * low.delta(base)).half()  # one fp32 sum, one rounding
        assert torch.equal(half.hybrid_tensors[key], expected), key


def test_cli_add_shard_on_a_single_file_base(tmp_path, tiny_preset, studio):
    """add-shard validates against the base the preset names, also when it is a single file with
    `config:` (it used to look for <base>/unet and fail)."""
    import yaml

    from soup_ui.cli import main

    pipe = studio.pipe
    single = formats.ldm_checkpoint(dict(studio.base_tensors), pipe.unet.config, pipe.vae.state_dict(), pipe.vae.config,
                                    [pipe.text_encoder.state_dict()], "sd1")
    save_file({k: v.contiguous().clone() for k, v in single.items()}, str(tmp_path / "base.safetensors"))
    data = yaml.safe_load(tiny_preset.read_text())
    data["base"], data["config"] = str(tmp_path / "base.safetensors"), str(studio.preset.base)
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "more.yaml"
    shard = tiny_preset.parent / "gamma.safetensors"
    assert main(["add-shard", "--preset", str(tmp_path / "single.yaml"), "--name", "delta", "--path", str(shard), "--out", str(out)]) == 0
    assert [s.name for s in load_preset(out).shards][-1] == "delta" and load_preset(out).config == studio.preset.base


def test_a_base_folder_saved_as_a_variant_loads_and_exports_alike(tmp_path, tiny_preset, studio):
    """A base saved with save_pretrained(variant="fp16") (every file *.fp16.safetensors) loads, and its
    pipeline export names the soup UNet the same way, so it loads as the base does."""
    import yaml
    from diffusers import StableDiffusionPipeline

    from soup_ui.engine.studio import folder_variant

    pipe = StableDiffusionPipeline.from_pretrained(studio.preset.base, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(tmp_path / "base", variant="fp16")
    assert folder_variant(tmp_path / "base") == "fp16" and folder_variant(studio.preset.base) is None
    data = yaml.safe_load(tiny_preset.read_text())
    data["base"] = str(tmp_path / "base")
    data["shards"] = [{**s, "path": str(tiny_preset.parent / s["path"])} for s in data["shards"]]
    (tmp_path / "variant.yaml").write_text(yaml.safe_dump(data))
    other = Studio(load_preset(tmp_path / "variant.yaml"))
    assert other.base_found.kind == "diffusers UNet (fp16 variant)"
    assert other.render_soup(other.make_mix({"alpha": 1, "beta": 1}), SETTINGS).image.size == (16, 16)
    out = exports.pipeline_folder(other, other.make_mix({"alpha": 1, "beta": 1}), tmp_path / "exported")
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(out, variant="fp16", safety_checker=None, requires_safety_checker=False)
    soup = other.souped_weights(other.make_mix({"alpha": 1, "beta": 1}))
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in soup.items())
