"""Adapters as shards, each made with its own tool (peft, lycoris-lora) and compared with that tool's
own merge: DoRA (peft and LyCORIS), LyCORIS full networks, LoRAs carrying peft's config; IA3, GLoRA
and the rest refused in one line naming the network type."""

import json

import pytest
import torch
from safetensors.torch import save_file

from soup_ui.modelfiles.checkpoints import CheckpointError
from soup_ui.cli import main
from test_formats import base_unet_dir, hybrid_after

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # linear and convolution weights


def base_unet(studio):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base_unet_dir(studio))


def randomize(module, seed, names=("lora_", "magnitude")):
    """Move the adapter's own parameters off their initial values, so that it changes something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn_like(p) * 0.2)


def peft_dora(studio, folder, seed, metadata=False):
    """A peft DoRA (use_dora=True) on the base UNet, as diffusers' save_lora_weights writes it
    (`metadata`: with the LoraConfig, as diffusers writes it when given one)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = base_unet(studio)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
    unet.add_adapter(config)
    randomize(unet, seed)
    extra = {"unet_lora_adapter_metadata": config.to_dict()} if metadata else {}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True, **extra)
    return folder / "pytorch_lora_weights.safetensors"


def lycoris_network(studio, file, seed, algo, read_back=False, **kwargs):
    """A LyCORIS network made by lycoris-lora's own kohya entry point, on the attention and resnet
    modules, saved as the trainers save it (kohya names: lora_unet_<module>); returns the base UNet's
    weights with that network merged by lycoris-lora itself: the network as made, or `read_back`
    from the file (lycoris cannot read back a wd_on_output=False DoRA; a full network cannot be
    merged once applied)."""
    from lycoris.kohya import create_network

    preset = file.with_suffix(".toml")
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\nunet_target_name = ["conv_in"]\n')
    unet = base_unet(studio)
    network = create_network(1.0, 2, 4, None, None, unet, algo=algo, preset=str(preset), **kwargs)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    randomize(network, seed, names=("",))
    network.save_weights(str(file), None, {})
    if read_back:
        return lycoris_merged(studio, file)
    network.merge_to(None, unet, {"lora_unet_": None}, None, None)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def lycoris_merged(studio, file):
    """The network read back from the file by lycoris-lora and merged into the base UNet."""
    from lycoris.kohya import create_network_from_weights
    from safetensors.torch import load_file

    unet = base_unet(studio)
    weights = load_file(str(file))
    network, _ = create_network_from_weights(1.0, str(file), None, None, unet, weights_sd=weights)
    network.merge_to(None, unet, weights, None, None)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def assert_shard_is(studio, name, file, expected, kind):
    """The shard alone equals `expected`; in a soup with gamma, the soup of `expected` and gamma."""
    base = {k: v.clone() for k, v in studio.base_tensors.items()}
    changed = [k for k in base if not torch.equal(expected[k], base[k])]
    assert len(changed) >= 10  # the adapter changes many weights
    shard = studio.add_shard(name, file)
    try:
        assert shard.weights.kind == kind
        alone = hybrid_after(studio, {name: 1})
        worst = max(float((alone[k] - expected[k]).abs().max()) for k in base)
        assert worst <= 2e-6, worst
        mixed = hybrid_after(studio, {name: 1, "gamma": 1})
        gamma = studio.shards["gamma"].tensors
        for k in changed:
            torch.testing.assert_close(mixed[k], 0.5 * expected[k] + 0.5 * gamma[k], rtol=0, atol=2e-6)
    finally:
        studio.remove_shard(name)


def test_a_peft_dora_soups_as_diffusers_fuses_it(tmp_path, studio):
    """DoRA's magnitude is applied (it was ignored: off by 42% of the change DoRA makes), on linear
    and convolution weights alike, exactly as peft merges it through diffusers' fuse_lora."""
    from tiny import fused_lora

    file = peft_dora(studio, tmp_path, seed=3)
    expected = fused_lora(studio.preset.base, file)
    assert_shard_is(studio, "dora", file, expected, "diffusers/peft DoRA")


def test_a_lora_carrying_its_peft_config_uses_its_alpha(tmp_path, studio):
    """diffusers reads lora_alpha (and r, patterns, rsLoRA) from the file's lora_adapter_metadata;
    so does the studio (alpha 4 over rank 2 doubles the change)."""
    from tiny import fused_lora

    file = peft_dora(studio, tmp_path, seed=4, metadata=True)
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 4
    expected = fused_lora(studio.preset.base, file)
    assert_shard_is(studio, "dora-config", file, expected, "diffusers/peft DoRA")


@pytest.mark.parametrize("on_output", [True, False])
def test_a_lycoris_dora_soups_as_lycoris_merges_it(tmp_path, studio, on_output):
    """LyCORIS' DoRA (dora_scale; norms per output channel, or per input with wd_on_output=False),
    which diffusers drops with a warning, equals lycoris-lora's own merge."""
    file = tmp_path / "dora.safetensors"
    merged = lycoris_network(studio, file, 5, "lora", dora_wd=True, wd_on_output=on_output)
    assert_shard_is(studio, "lyco-dora", file, merged, "LyCORIS DoRA (kohya naming)")


def test_a_lycoris_full_network_is_a_weight_difference(tmp_path, studio):
    """A LyCORIS "full" network (diff and diff_b per module) equals lycoris-lora's own merge, biases included."""
    file = tmp_path / "full.safetensors"
    expected = lycoris_network(studio, file, 6, "full", read_back=True)
    assert any(k.endswith(".bias") and not torch.equal(v, studio.base_tensors[k]) for k, v in expected.items())
    assert_shard_is(studio, "full", file, expected, "LyCORIS full network (weight differences)")


def peft_ia3(studio, file):
    from peft import IA3Config, get_peft_model_state_dict, inject_adapter_in_model

    unet = inject_adapter_in_model(IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"]), base_unet(studio))
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, str(file))
    return file


@pytest.mark.parametrize("made", ["peft IA3", "LyCORIS IA3", "LyCORIS GLoRA", "LyCORIS LoHa", "LyCORIS LoKr", "peft OFT", "peft BOFT"])
def test_adapters_without_an_exact_merge_are_refused_in_one_line(tmp_path, tiny_preset, studio, capsys, made):
    """Each refused naming its network type, by the studio and by the CLI (exit 2, one line; IA3
    crashed add-shard with an IndexError traceback)."""
    file = tmp_path / "adapter.safetensors"
    if made == "peft IA3":
        peft_ia3(studio, file)
    elif made in ("peft OFT", "peft BOFT"):
        from peft import BOFTConfig, OFTConfig, get_peft_model_state_dict, inject_adapter_in_model

        config = OFTConfig(r=0, oft_block_size=4, target_modules=["to_q"]) if made == "peft OFT" else BOFTConfig(boft_block_size=4, target_modules=["to_q"])
        unet = inject_adapter_in_model(config, base_unet(studio))
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, str(file))
    else:
        algo = made.split()[1].lower()
        lycoris_network(studio, file, 1, algo)
    expected = {"peft IA3": "a peft IA3 adapter", "LyCORIS IA3": "a LyCORIS IA3 network", "LyCORIS GLoRA": "a LyCORIS GLoRA network",
                "LyCORIS LoHa": "a LyCORIS LoHa network", "LyCORIS LoKr": "a LyCORIS LoKr network", "peft OFT": "a peft OFT adapter",
                "peft BOFT": "a peft BOFT adapter"}[made]
    with pytest.raises(CheckpointError) as err:
        studio.add_shard("adapter", file)
    assert str(err.value).startswith(f"adapter.safetensors: {expected} (") and "LyCORIS full networks are supported" in str(err.value)
    assert "adapter" not in studio.shards
    capsys.readouterr()
    assert main(["add-shard", "--preset", str(tiny_preset), "--name", "x", "--path", str(file), "--out", str(tmp_path / "x.yaml")]) == 2
    out = capsys.readouterr().err.strip()
    assert expected in out and len(out.splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()
