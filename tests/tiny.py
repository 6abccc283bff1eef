"""Tiny real diffusers pipelines and shards, built from random weights in a folder (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

WORDS = ["a", "cat", "dog", "face", "red", "apple", "blue", "car", "smiling", "with", "heart"]


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789!?.,:-'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in WORDS:  # left-to-right merges that build each whole word
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16, pad_token="<|endoftext|>")


def make_unet(seed: int = 0, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def make_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline of a few thousand parameters, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=make_unet(seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def finetuned(base_unet, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The base UNet's weights plus seeded noise: a stand-in for a finetune."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)).contiguous() for k, v in base_unet.state_dict().items()}


def make_preset(folder: Path, names=("alpha", "beta", "gamma")) -> Path:
    """A base pipeline, one shard as a diffusers unet/ folder and the rest as .safetensors files, and a preset."""
    from diffusers import UNet2DConditionModel

    base = make_pipeline(folder / "base")
    base_unet = UNet2DConditionModel.from_pretrained(base / "unet")
    shards = []
    for i, name in enumerate(names):
        weights = finetuned(base_unet, seed=100 + i)
        if i == 0:
            unet = make_unet()
            unet.load_state_dict(weights)
            unet.save_pretrained(folder / name)
            path = name
        else:
            save_file(weights, str(folder / f"{name}.safetensors"))
            path = f"{name}.safetensors"
        shards.append({"name": name, "path": path, "weight": 1.0, "description": f"test shard {name}"})
    preset = {
        "name": "tiny",
        "description": "tiny random test models",
        "base": "base",
        "shards": shards,
        "render": {"prompts": ["a red apple", "a cat face"], "seed": 0, "steps": 3, "guidance_scale": 4.0, "height": 16, "width": 16},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


def make_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline of a few thousand parameters: two CLIP text encoders (the second
    with a projection, as SDXL's OpenCLIP-bigG), a UNet with SDXL's `text_time` conditioning."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    # Widths differ, as in SDXL (768 and 1280): diffusers' single-file loader tells the encoders apart by width.
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text, "hidden_size": 48}, hidden_act="gelu", projection_dim=48))
    unet = make_sdxl_unet(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


def make_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 48,  # time ids + pooled text
        cross_attention_dim=32 + 48, norm_num_groups=8,  # the two text encoders' widths, concatenated
    ).eval()


def make_sdxl_preset(folder: Path, names=("ink", "pastel")) -> Path:
    """An SDXL base pipeline folder and UNet shards as .safetensors files, and a preset."""
    from diffusers import UNet2DConditionModel

    base = make_sdxl_pipeline(folder / "base")
    base_unet = UNet2DConditionModel.from_pretrained(base / "unet")
    shards = []
    for i, name in enumerate(names):
        save_file(finetuned(base_unet, seed=200 + i), str(folder / f"{name}.safetensors"))
        shards.append({"name": name, "path": f"{name}.safetensors", "description": f"test SDXL shard {name}"})
    preset = {
        "name": "tiny-sdxl",
        "description": "tiny random SDXL test models",
        "base": "base",
        "shards": shards,
        "render": {"prompts": ["a red apple"], "seed": 0, "steps": 3, "guidance_scale": 4.0, "height": 16, "width": 16, "scheduler": "euler"},
    }
    path = folder / "tiny-sdxl.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path
