"""The shipped configs of SD 1.x, SD 2.x and SDXL, and the CLIP tokenizer rebuilt offline: a single-file
base of these families loads with no `config:`. Checked against facts that do not come from the
configs: the published parameter counts, diffusers' own family detection on checkpoints in the
original naming, and open_clip's tokenizer (the full-size random-weight loads are in
bench/family_check.py)."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from soup_ui.engine import exports
from soup_ui.modelfiles import families, formats, ldm_names
from soup_ui.modelfiles.checkpoints import CheckpointError

# Published sizes: UNet, VAE, text encoder(s) (SD 2.x: OpenCLIP ViT-H without its last layer, as diffusers keeps it).
PARAMETERS = {
    "sd1": (859_520_964, 83_653_863, [123_060_480]),
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}
DIFFUSERS_TYPE = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}


def meta_models(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = families.config_folder(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        texts = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if (folder / "text_encoder_2").is_dir():
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    return folder, unet, vae, texts


@pytest.mark.parametrize("family", sorted(PARAMETERS))
def test_shipped_configs_build_models_of_the_published_sizes(family):
    _, unet, vae, texts = meta_models(family)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), [count(t) for t in texts]) == PARAMETERS[family]


@pytest.mark.parametrize("family", sorted(PARAMETERS))
def test_diffusers_detects_each_family_from_its_original_naming(family, tmp_path):
    """The UNet in LDM names (shapes only, meta tensors) is what diffusers' own single-file detection
    calls this family; our header detection agrees, from a real safetensors header."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    _, unet, _, _ = meta_models(family)
    names = ldm_names.ldm_unet_names(list(unet.state_dict()), unet.config)
    checkpoint = {formats.LDM_PREFIX + names[k]: v for k, v in unet.state_dict().items()}
    if family == "sdxl":
        checkpoint["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = torch.empty(1280, device="meta")  # OpenCLIP-G
    assert infer_diffusers_model_type(checkpoint) == DIFFUSERS_TYPE[family]
    # header detection, on a file with the identifying tensors at their real shapes
    keep = [k for k in checkpoint if "attn2.to_k" in k or "label_emb" in k or k.startswith("conditioner.")][:3]
    from safetensors.torch import save_file

    save_file({k: torch.zeros(checkpoint[k].shape, dtype=torch.float16) for k in keep}, str(tmp_path / "head.safetensors"))
    assert families.single_file_family(tmp_path / "head.safetensors") == family


def test_an_unknown_family_is_refused_naming_its_width(tiny_preset):
    from soup_ui.modelfiles.presets import load_preset
    from soup_ui.engine.studio import Studio

    studio = Studio(load_preset(tiny_preset))
    out = exports.single_file(studio, studio.make_mix({"alpha": 1}), tiny_preset.parent / "tiny-single.safetensors")
    with pytest.raises(CheckpointError, match="32-wide cross-attention; give `config:`"):
        families.single_file_family(out)


def open_clip_tokenizer():
    """open_clip's own tokenizer module, loaded alone (the package's __init__ needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "the tests need open_clip_torch (installed by .ci/run with --no-deps)"
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(context_length=77)


def varied_strings(count=400, seed=0):
    rng = random.Random(seed)
    words = ("a photo of an astronaut riding horse on mars red heart grinning face with big eyes cat's 3D render "
             "Émilie café naïve résumé UPPER lower MiXeD 1024x768 #hashtag @user e-mail_address http://x.y/z?q=1 "
             "&amp; &lt;tag&gt; 👍 🐱 ❤️ 日本語 Привет ünïcödé tab\tand  spaces   (parens) [brackets] {braces} "
             "can't won't isn't ... !!! ??? --- *** ~~~ 1,000,000 3.14159 50% $5 don’t “quotes”").split(" ")
    out = ["", " ", "a", "A cat.", "emoji, face-smiling", "x" * 300]
    while len(out) < count:
        n = rng.choice([1, 2, 5, 12, 40, 90])  # some longer than 77 tokens: truncation
        out.append(rng.choice([" ", "  ", ", "]).join(rng.choice(words) for _ in range(n)))
    return out


def test_the_rebuilt_clip_tokenizer_gives_open_clip_ids():
    """Same ids as open_clip's own tokenizer. open_clip first fixes the text (ftfy, HTML entities),
    which transformers' CLIPTokenizer does not do (for any CLIP tokenizer, the Hub's too), so both get
    the text as open_clip cleans it: what is compared is the vocabulary, the merges and the splitting."""
    from transformers import CLIPTokenizer

    reference = open_clip_tokenizer()
    strings = [reference.clean_fn(s) for s in varied_strings()]
    expected = reference(strings).tolist()  # SOT, ids, EOT, zeros ("!") to 77; truncated with EOT last
    sd1 = CLIPTokenizer.from_pretrained(families.config_folder("sd1") / "tokenizer")  # pads with <|endoftext|>
    ids = sd1(strings, padding="max_length", max_length=77, truncation=True).input_ids
    mismatches = [(s, a, b) for s, a, b in zip(strings, ids, expected) if a[: b.index(49407) + 1] != b[: b.index(49407) + 1]]
    assert len(strings) >= 300 and not mismatches, mismatches[:2]
    assert all(set(a[b.index(49407) + 1 :]) <= {49407} for a, b in zip(ids, expected))
    # SD 2.x and SDXL's second tokenizer pad with "!" (id 0), as open_clip does: equal to the last id.
    # (transformers makes a pad token an added token, so a "!" in the text is split off alone: left out here.)
    sd2 = CLIPTokenizer.from_pretrained(families.config_folder("sd2") / "tokenizer")
    plain = [s for s in strings if "!" not in s]
    assert len(plain) > 200
    assert sd2(plain, padding="max_length", max_length=77, truncation=True).input_ids == reference(plain).tolist()


def test_a_single_file_base_without_config_uses_the_shipped_family_configs(tmp_path):
    from soup_ui.modelfiles.presets import PresetError, load_preset

    head = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    save_file({formats.LDM_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 2048)}, str(head))
    (tmp_path / "p.yaml").write_text(f"base: {head}\nshards:\n  - name: a\n    path: {head}\n")
    assert load_preset(tmp_path / "p.yaml").config is None
    config = json.loads((families.base_config(head, None) / "unet" / "config.json").read_text())
    assert config["cross_attention_dim"] == 2048 and config["addition_embed_type"] == "text_time"
    save_file({formats.LDM_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}, str(head))
    preset = load_preset(tmp_path / "p.yaml")
    assert preset.config is None
    config, _ = formats.base_unet(preset.base, preset.config)
    assert config["cross_attention_dim"] == 768 and config["block_out_channels"] == [320, 640, 1280, 1280]
    save_file({formats.LDM_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 100)}, str(head))
    with pytest.raises(PresetError, match="base: base.safetensors: not a single file of a family with shipped configs .*100-wide"):
        load_preset(tmp_path / "p.yaml")


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[1] / "presets" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_presets_are_valid_and_only_lack_their_files(example):
    """presets/examples/: every field valid; loading says which path to fill in."""
    import yaml

    from soup_ui.modelfiles.presets import Preset, PresetError, load_preset

    Preset.model_validate(yaml.safe_load(example.read_text()))
    with pytest.raises(PresetError, match="base: no diffusers pipeline|no such file"):
        load_preset(example)
