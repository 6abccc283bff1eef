"""SD3 and FLUX.1: the studio soups the transformer of a StableDiffusion3Pipeline or FluxPipeline
(flow matching; T5 + CLIP text encoders; FLUX packs its latents), built tiny the way diffusers' own
pipeline tests build theirs. The same engine as SD and SDXL: one family table, one render path."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from soup_ui.engine import exports
from soup_ui.modelfiles.checkpoints import CheckpointError
from soup_ui.modelfiles.presets import RenderSettings, load_preset
from soup_ui.engine.studio import RuntimeOptions, Studio, StudioError
from tiny import finetuned, fused_lora, make_family_preset, make_flux_pipeline, make_flux_transformer, make_sd3_transformer, make_sdxl_unet

FLOW = ["sd3", "flux"]
SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=7, scheduler="default")


@pytest.fixture(scope="module", params=FLOW)
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_family_preset(folder, request.param)


@pytest.fixture(scope="module")
def studio(family):
    return Studio(load_preset(family[1]))


def first_inputs(studio, run):
    """The latents each denoiser run of `run()` started from (the first call's input of each run)."""
    seen = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.append((id(module), x[:1].detach().clone()))  # with CFG the batch is [negative, positive] of the same latents

    modules = [studio.hybrid] + [s.unet for s in studio.shards.values() if s.unet is not None]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    steps = SETTINGS.steps
    return out, [x for i, (_, x) in enumerate(seen) if i % steps == 0]


def test_a_flow_family_loads_mixes_and_renders_every_image_from_the_same_noise(studio, family):
    name, preset = family
    assert type(studio.pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[name]
    assert studio.kind.denoiser == "transformer" and studio.hybrid is studio.pipe.transformer
    results, starts = first_inputs(studio, lambda: studio.render(studio.make_mix({"ink": 1, "pastel": 1, "chalk": 2}), SETTINGS))
    assert [r.label for r in results][:3] == ["ink", "pastel", "chalk"] and results[-1].kind == "soup"
    assert len(starts) == 4 and all(torch.equal(starts[0], x) for x in starts[1:])
    if name == "flux":  # packed: (1, (16/2) * (16/2) patches of 2x2, 1 latent channel x 4)
        assert tuple(starts[0].shape) == (1, 64, 4)
    else:
        assert tuple(starts[0].shape) == (1, 4, 16, 16)
    images = [np.asarray(r.image) for r in results]
    assert all(img.shape == (16, 16, 3) for img in images)
    assert len({img.tobytes() for img in images}) == 4  # four different models, four different images
    # the soup is the weighted average of the shards' transformers
    files = {n: load_file(str(preset.parent / f"{n}.safetensors")) for n in ("ink", "pastel", "chalk")}
    soup = studio.souped_weights(studio.make_mix({"ink": 1, "pastel": 1, "chalk": 2}))
    assert set(soup) == set(files["ink"])
    for k in soup:
        torch.testing.assert_close(soup[k], (files["ink"][k] + files["pastel"][k] + 2 * files["chalk"][k]) / 4, rtol=0, atol=1e-6)
    # a soup of one shard is that shard's image (the same noise, the same weights)
    assert np.array_equal(np.asarray(studio.render_soup(studio.make_mix({"ink": 1}), SETTINGS).image), images[0])


def test_a_flow_soup_exports_as_a_pipeline_diffusers_renders_identically(studio, tmp_path):
    from diffusers import DiffusionPipeline

    mix = {"ink": 2, "chalk": 1}
    out = exports.pipeline_folder(studio, studio.make_mix(mix), tmp_path / "soup")
    back = DiffusionPipeline.from_pretrained(out)
    assert type(back) is type(studio.pipe)
    soup = studio.souped_weights(studio.make_mix(mix))
    got = back.transformer.state_dict()
    assert all(torch.equal(got[k], soup[k]) for k in soup)
    # the exported pipeline, given the studio's starting noise, draws the studio's soup image
    back.set_progress_bar_config(disable=True)
    image = back(prompt=SETTINGS.prompt, num_inference_steps=SETTINGS.steps, guidance_scale=SETTINGS.guidance_scale, height=16, width=16,
                 latents=studio.renderer.initial_noise(SETTINGS), output_type="np").images[0]
    ours = np.asarray(studio.render_soup(studio.make_mix(mix), SETTINGS).image).astype(np.float32) / 255
    assert np.abs(image - ours).max() <= 1.5 / 255
    # the transformer alone, as diffusers and ComfyUI load it
    file = exports.denoiser_file(studio, studio.make_mix(mix), tmp_path / "soup-transformer.safetensors")
    assert set(load_file(str(file))) == set(soup)


def test_a_single_file_export_of_a_flow_family_is_refused_saying_what_to_do(studio, tmp_path):
    with pytest.raises(StudioError, match=r"single-file \(LDM\) export is for SD 1.x, SD 2.x and SDXL; export this .* soup as its transformer"):
        exports.single_file(studio, studio.make_mix({"ink": 1}), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_shard_of_another_family_is_refused_in_one_line(studio, family, tmp_path):
    other = {"sd3": make_flux_transformer, "flux": make_sd3_transformer}[family[0]]
    for make, what in ((other, "FLUX.1 transformer" if family[0] == "sd3" else "SD3 transformer"), (make_sdxl_unet, "UNet")):
        bad = tmp_path / f"{what}.safetensors"
        save_file(make().state_dict(), str(bad))
        with pytest.raises(CheckpointError) as err:
            studio.add_shard("bad", bad)
        ours = "SD3 transformer" if family[0] == "sd3" else "FLUX.1 transformer"
        assert str(err.value) == f"{bad.name}: a checkpoint of {what}; this base's denoiser is {ours}"
        assert "bad" not in studio.shards


def test_a_transformer_lora_soups_like_the_lora_fused_first(studio, family, tmp_path):
    """A LoRA made with peft on the base transformer and saved by the pipeline's save_lora_weights
    stays low rank in the studio; its soup equals diffusers' load_lora_weights + fuse_lora."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = type(studio.hybrid).from_pretrained(studio.preset.base / "transformer")
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    type(studio.pipe).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True)
    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    fused = fused_lora(studio.preset.base, lora_file)
    shard = studio.add_shard("lora", lora_file)
    try:
        assert shard.weights.lora and shard.weights.unet is None and "LoRA" in shard.weights.kind
        studio.mix(studio.make_mix({"lora": 1}))
        base = dict(studio.base_tensors)
        assert any(not torch.equal(fused[k], base[k]) for k in base)
        for k in base:
            torch.testing.assert_close(studio.hybrid_tensors[k], fused[k], rtol=0, atol=1e-6)
        results = studio.render(studio.make_mix({"lora": 1, "ink": 1}), SETTINGS)
        assert len(results) == 3
    finally:
        studio.remove_shard("lora")


def test_flow_families_take_only_their_own_scheduler_and_flux_no_negative_prompt(studio, family):
    with pytest.raises(StudioError, match="samples with its own flow-matching scheduler: choose scheduler 'default', not 'dpm\\+\\+'"):
        studio.render(studio.make_mix({"ink": 1}), SETTINGS.model_copy(update={"scheduler": "dpm++"}))
    negative = SETTINGS.model_copy(update={"negative_prompt": "a dog"})
    if family[0] == "flux":
        with pytest.raises(StudioError, match="FLUX.1 takes no negative prompt"):
            studio.render(studio.make_mix({"ink": 1}), negative)
    else:  # SD3 has classifier-free guidance: the negative prompt changes the image
        a, b = (np.asarray(studio.render_soup(studio.make_mix({"ink": 1}), s).image) for s in (SETTINGS, negative))
        assert not np.array_equal(a, b)


def test_family_defaults_fill_what_the_preset_leaves_out(studio, family):
    r = studio.preset.render
    assert r.scheduler == "default"  # the preset sets no scheduler: the family's flow-matching one
    assert (r.steps, r.guidance_scale, r.height) == (3, 4.0, 16)  # what the preset sets is kept


def test_lean_mode_streams_a_transformer_and_renders_the_same(studio, family):
    lean = Studio(load_preset(family[1]), RuntimeOptions(lean=True))
    assert lean.lean and "streamed from their files (lean)" in lean.memory_plan
    a = np.asarray(lean.render_soup(lean.make_mix({"ink": 1, "pastel": 1}), SETTINGS).image)
    b = np.asarray(studio.render_soup(studio.make_mix({"ink": 1, "pastel": 1}), SETTINGS).image)
    assert np.array_equal(a, b)


def test_flux_schnell_has_no_guidance_and_its_own_defaults(tmp_path):
    import yaml

    base = make_flux_pipeline(tmp_path / "base", guidance=False)
    denoiser = type(make_flux_transformer(guidance=False)).from_pretrained(base / "transformer")
    save_file(finetuned(denoiser, seed=1), str(tmp_path / "fast.safetensors"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"base": "base", "shards": [{"name": "fast", "path": "fast.safetensors"}]}))
    studio = Studio(load_preset(tmp_path / "p.yaml"))
    assert studio.renderer.family_name == "FLUX.1 [schnell]" and studio.renderer.guidance_distilled is False
    r = studio.preset.render
    assert (r.steps, r.guidance_scale, r.scheduler, r.height) == (4, 0.0, "default", 128)  # 128: this tiny VAE does not downsample
    image = studio.render_soup(studio.make_mix({"fast": 1}), SETTINGS).image
    assert image.size == (16, 16)


def test_pinned_memory_holds_shards_off_the_device_and_soups_the_same(studio, family):
    """The pinned tier (a GPU's overflow: CPU memory, copied to the device tensor by tensor for each
    soup), forced here on the CPU: no module per shard, the same soup and images as resident shards."""
    pinned = Studio(load_preset(family[1]), RuntimeOptions(memory="pinned"))
    assert pinned.memory_plan.endswith("in pinned CPU memory, copied to the device for each soup: as asked (--memory pinned)")
    assert all(s.weights.tier == "pinned" and s.unet is None for s in pinned.shards.values())
    mix = {"ink": 1, "chalk": 3}
    a, b = pinned.souped_weights(pinned.make_mix(mix)), studio.souped_weights(studio.make_mix(mix))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert np.array_equal(np.asarray(pinned.render_component(pinned.shards["pastel"], SETTINGS).image), np.asarray(studio.render_component(studio.shards["pastel"], SETTINGS).image))


def test_the_memory_plan_counts_what_the_path_holds_besides_the_shards(studio, monkeypatch):
    """Issue 33, defect 5: the plan counted the shards' denoisers only (6.9 GB "fit" in 80% of 15.9 GB;
    the export peaked at 18.2 GB). It now counts their text encoders when mixed, a shard being loaded
    and the export's copy of the soup, and streams the shards when all of it would not fit."""
    import soup_ui.engine.pool as pool_module

    pool = studio.pool
    for kept in ("resident_slots", "spill", "lean", "memory_plan"):
        monkeypatch.setattr(pool, kept, getattr(pool, kept))
    monkeypatch.setattr(pool, "device", torch.device("cpu"))
    monkeypatch.setattr(pool_module, "free_memory", lambda d: int(4e9))
    pool.plan(2, int(1e9))  # 2 GB of shards and 1 GB while one loads: 3 GB fit in 3.2 GB
    assert (pool.spill, pool.lean) == ("resident", False)
    assert pool.memory_plan == "2 shards of 1,000 MB held in memory: 3.0 GB (shards 2.0 GB, a shard being loaded 1.0 GB) fit in 80% of the 4.0 GB free on cpu"
    pool.plan(2, int(1e9), text_bytes=int(0.2e9), exporting=True)  # the shards alone (2.4 GB) fit; with the rest they do not
    assert (pool.spill, pool.lean) == ("lean", True)
    assert pool.memory_plan == ("2 shards of 1,000 MB (+ 200 MB of text encoders each) streamed from their files (lean): 4.8 GB (shards 2.4 GB, "
                                "a shard being loaded 1.2 GB, the export's copy of the soup 1.2 GB) would not fit in 80% of the 4.0 GB free on cpu")


def test_the_memory_plan_fills_the_gpu_then_pinned_memory(studio, monkeypatch):
    """The plan on a GPU too small for every shard (free memory faked): as many resident as fit in
    80% of it, the rest pinned; a later shard goes where the plan has room."""
    import soup_ui.engine.pool as pool_module

    unet_bytes = 1_000_000_000
    pool = studio.pool
    for kept in ("resident_slots", "spill", "lean", "memory_plan"):  # the module's studio gets its own plan back
        monkeypatch.setattr(pool, kept, getattr(pool, kept))
    monkeypatch.setattr(pool, "device", torch.device("cuda"))
    monkeypatch.setattr(pool_module, "free_memory", lambda d: int(2.6e9) if d.type == "cuda" else int(64e9))
    studio.pool.plan(4, unet_bytes)
    assert (pool.resident_slots, pool.spill, studio.lean) == (2, "pinned", False)
    assert studio.memory_plan == ("4 shards of 1,000 MB: 2 held on cuda (2.1 GB of its 2.6 GB free), the other 2 in pinned CPU memory, "
                                  "copied to the device for each soup (2.0 GB, a shard being loaded 1.0 GB; 64.0 GB free in CPU memory)")
    monkeypatch.setattr(pool_module, "free_memory", lambda d: int(2.6e9) if d.type == "cuda" else int(2e9))
    studio.pool.plan(4, unet_bytes)
    assert pool.spill == "lean" and "the other 2 streamed from their files (lean)" in studio.memory_plan
    with pytest.raises(StudioError, match="memory 'gpu': choose one of resident, pinned, lean"):
        monkeypatch.setattr(pool, "options", RuntimeOptions(memory="gpu"))
        studio.pool.plan(4, unet_bytes)


def test_an_original_flux_file_is_read_through_diffusers_converter(studio, family, tmp_path):
    """FLUX.1 transformer files as distributed (BFL naming: double_blocks.*.img_attn.qkv) are detected
    from the header and converted by diffusers' own converter (checked at FLUX's real widths by
    bench/family_check.py: every tensor exact). That converter knows only FLUX's real widths, so a
    tiny one is refused naming the format; on an SD3 base it is refused as another family."""
    from tiny import bfl_shapes

    file = tmp_path / "flux1-tiny.safetensors"
    save_file({k: torch.zeros(s) for k, s in bfl_shapes(1, 1, hidden=32, mlp=128, head=16).items()}, str(file))
    with pytest.raises(CheckpointError) as err:
        studio.add_shard("bfl", file)
    if family[0] == "flux":
        assert str(err.value).startswith("flux1-tiny.safetensors: an original FLUX.1 transformer file that diffusers cannot convert (")
    else:
        assert str(err.value) == "flux1-tiny.safetensors: a checkpoint of FLUX.1 transformer; this base's denoiser is SD3 transformer"


def test_a_kohya_flux_lora_in_bfl_block_names_soups_like_diffusers_fuse(studio, family, tmp_path):
    """kohya's FLUX LoRAs name Black Forest Labs' blocks (lora_unet_double_blocks_0_img_attn_qkv, fused
    q/k/v, with .alpha): diffusers' FLUX LoRA converter splits them; the soup equals diffusers' fuse."""
    if family[0] != "flux":
        pytest.skip("a FLUX naming")
    g = torch.Generator().manual_seed(0)
    kohya = {}
    for side in ("img", "txt"):
        stem = f"lora_unet_double_blocks_0_{side}_attn_qkv"
        kohya |= {f"{stem}.lora_down.weight": torch.randn(2, 32, generator=g), f"{stem}.lora_up.weight": torch.randn(96, 2, generator=g) * 0.1,
                  f"{stem}.alpha": torch.tensor(4.0)}
    lora_file = tmp_path / "kohya-flux.safetensors"
    save_file(kohya, str(lora_file))
    fused = fused_lora(studio.preset.base, lora_file)
    shard = studio.add_shard("kohya", lora_file)
    try:
        assert shard.weights.kind == "kohya LoRA" and len(shard.weights.lora) == 6  # q, k, v of the image and the text stream
        studio.mix(studio.make_mix({"kohya": 1}))
        base = dict(studio.base_tensors)
        assert not torch.equal(fused["transformer_blocks.0.attn.add_k_proj.weight"], base["transformer_blocks.0.attn.add_k_proj.weight"])
        for k in base:
            torch.testing.assert_close(studio.hybrid_tensors[k], fused[k], rtol=0, atol=1e-6)
    finally:
        studio.remove_shard("kohya")


def test_the_cli_renders_a_flow_preset_with_its_family_defaults(family, tmp_path):
    """`render` on a preset that names no scheduler: the CLI starts from the studio's defaults (the
    family's flow-matching scheduler), not the generic ones it would refuse."""
    from PIL import Image

    from soup_ui.cli import main

    out = tmp_path / "strip.png"
    assert main(["render", "--preset", str(family[1]), "--mix", "ink=1,pastel=1", "--out", str(out)]) == 0
    strip = Image.open(out)
    assert strip.width >= 3 * 16 and strip.height >= 16


@pytest.mark.parametrize("unet_family", ["sd1", "sdxl"])
def test_unet_families_also_start_every_image_from_the_same_noise(unet_family, tmp_path):
    studio = Studio(load_preset(make_family_preset(tmp_path, unet_family)))
    settings = SETTINGS.model_copy(update={"scheduler": "euler"})
    _, starts = first_inputs(studio, lambda: studio.render(studio.make_mix({"ink": 1, "pastel": 1}), settings))
    assert len(starts) == 3 and all(torch.equal(starts[0], x) for x in starts[1:])
    assert tuple(starts[0].shape) == (1, 4, 8, 8)  # 16 px through the tiny VAE's one downsampling


def test_the_ensemble_reference_renders_for_every_family(studio, family):
    """The ensemble used to call every denoiser with a UNet's signature: FLUX failed on its cache
    context, SD3 on a missing `sample`."""
    from soup_ui.engine import workflows

    ens, soup = workflows.ensemble(studio, studio.make_mix({"ink": 1, "pastel": 1}), SETTINGS)
    assert ens.label.startswith("ensemble: 0.50 ink + 0.50 pastel (") and soup.label == "soup: 0.50 ink + 0.50 pastel"
    single, _ = workflows.ensemble(studio, studio.make_mix({"ink": 1}), SETTINGS)
    component = studio.render_component(studio.shards["ink"], SETTINGS)
    assert np.array_equal(np.asarray(single.image), np.asarray(component.image))


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": 3}), ("slerp", {})])
def test_non_linear_methods_soup_the_same_on_every_tier(studio, family, method, params):
    """Resident, pinned and lean tiers merge tensor by tensor to the same weights."""
    mix = {"ink": 1, "pastel": 1}
    studio.mix(studio.make_mix(mix, method, params))
    resident = {k: v.clone() for k, v in studio.hybrid_tensors.items()}
    for memory in ("pinned", "lean"):
        other = Studio(load_preset(family[1]), RuntimeOptions(memory=memory))
        other.mix(other.make_mix(mix, method, params))
        assert all(torch.equal(other.hybrid_tensors[k], resident[k]) for k in resident), memory


def test_a_streamed_transformer_export_is_the_studios(studio, family, tmp_path):
    """`python -m soup_ui export` streams SD3 and FLUX transformers too: the same tensors and the
    same metadata as the studio's export (modelspec included: FLUX schnell is not called dev)."""
    from safetensors import safe_open

    from soup_ui.engine import stream

    streamed, _ = stream.export(load_preset(family[1]), {"ink": 1, "pastel": 1}, "average", {}, tmp_path / "s.safetensors")
    held = exports.denoiser_file(studio, studio.make_mix({"ink": 1, "pastel": 1}), tmp_path / "h.safetensors")
    with safe_open(str(streamed), "pt") as a, safe_open(str(held), "pt") as b:
        assert a.metadata() == b.metadata()
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())  # noqa: SIM118


def test_block_weights_on_a_transformer(studio, family):
    """Issue 20 for SD3 and FLUX: the transformer's own blocks (joint_blocks.N; double_blocks.N,
    single_blocks.N), a flat layout with one range per block, a block (1, 0) is shard A's exactly,
    groups by name, and the block-weighted soup renders."""
    from soup_ui.maths import soup

    blocks = studio.blocks
    group = "joint" if family[0] == "sd3" else "single"
    assert set(blocks.groups) == ({"joint"} if family[0] == "sd3" else {"double", "single"}) and blocks.ids[-1] == "final_layer"
    members = blocks.members()
    assert soup.part_ranges(studio.hybrid_tensors, [(members[b], ()) for b in blocks.ids]) is not None
    mix = studio.make_mix({"ink": 1, "pastel": 1}, blocks={"pastel": f"{group}:0,final_layer:0"})
    studio.mix(mix)
    ink, pastel = studio.shards["ink"].tensors, studio.shards["pastel"].tensors
    for block in (*blocks.groups[group], "final_layer"):
        for n in members[block]:
            assert torch.equal(studio.hybrid_tensors[n], ink[n]), n
    first = blocks.ids[0]
    for n in members[first]:
        torch.testing.assert_close(studio.hybrid_tensors[n], (ink[n] + pastel[n]) / 2, rtol=0, atol=1e-6)
    label = studio.render_soup(mix, SETTINGS).label
    assert label.startswith("soup: 0.50 ink + 0.50 pastel [blocks: pastel; ") and label.endswith("-final_layer 1.00 ink]")  # shares per block
