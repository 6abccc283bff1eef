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


def make_t5_tokenizer():
    """A T5 (Unigram) tokenizer over the test words and single letters, built offline."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789!?.,:-'"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=32)


def make_t5_encoder(tokenizer, d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def _clip_config(tokenizer, **over):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", projection_dim=32), **over})


def _flow_vae(latent_channels: int):
    """SD3's and FLUX's VAE layout (no quant convs, a shift factor), tiny: one block, so no downsampling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                         sample_size=16)


def make_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64).eval()


def make_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline as diffusers' own SD3 tests build it: two CLIP encoders with
    projections (pooled 32 + 32), a T5 encoder (64 wide), an MMDiT transformer, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, t5_tokenizer = make_tokenizer(folder / "_tokenizer_src"), make_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
    pipe = StableDiffusion3Pipeline(
        transformer=make_sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(4),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=make_t5_encoder(t5_tokenizer, 64, seed), tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder)
    return folder


def make_flux_transformer(seed: int = 0, guidance: bool = True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=guidance).eval()


def make_flux_pipeline(folder: Path, seed: int = 0, guidance: bool = True) -> Path:
    """A FluxPipeline as diffusers' own FLUX tests build it: CLIP (pooled) + T5 (sequence), a
    transformer over 2x2-packed latents, flow matching; `guidance` embeds FLUX.1-dev's distilled guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    tokenizer, t5_tokenizer = make_tokenizer(folder / "_tokenizer_src"), make_t5_tokenizer()
    torch.manual_seed(seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(1), text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        tokenizer=tokenizer, text_encoder_2=make_t5_encoder(t5_tokenizer, 32, seed), tokenizer_2=t5_tokenizer,
        transformer=make_flux_transformer(seed, guidance),
    )
    pipe.save_pretrained(folder)
    return folder


FAMILY_MAKERS = {"sd3": (make_sd3_pipeline, "transformer"), "flux": (make_flux_pipeline, "transformer"),
                 "sdxl": (make_sdxl_pipeline, "unet"), "sd1": (make_pipeline, "unet")}


def denoiser_class(folder: Path):
    import diffusers

    component = "transformer" if (folder / "transformer").is_dir() else "unet"
    return getattr(diffusers, json.loads((folder / component / "config.json").read_text())["_class_name"]), component


def make_family_preset(folder: Path, family: str, names=("ink", "pastel", "chalk")) -> Path:
    """A base pipeline of `family` and its denoiser's shards as .safetensors files, and a preset."""
    make, _ = FAMILY_MAKERS[family]
    base = make(folder / "base")
    cls, component = denoiser_class(base)
    denoiser = cls.from_pretrained(base / component)
    shards = []
    for i, name in enumerate(names):
        save_file(finetuned(denoiser, seed=300 + i), str(folder / f"{name}.safetensors"))
        shards.append({"name": name, "path": f"{name}.safetensors", "description": f"test {family} shard {name}"})
    preset = {
        "name": f"tiny-{family}",
        "description": f"tiny random {family} test models",
        "base": "base",
        "shards": shards,
        "render": {"prompts": ["a red apple"], "seed": 0, "steps": 3, "guidance_scale": 4.0, "height": 16, "width": 16},
    }
    path = folder / f"tiny-{family}.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


def bfl_shapes(double: int, single: int, joint: int = 32, pooled: int = 32, hidden: int = 3072, mlp: int = 12288, head: int = 128) -> dict:
    """Tensor names and shapes of a FLUX.1 transformer as Black Forest Labs distributes it
    (flux1-dev.safetensors), at FLUX's widths with `double` + `single` blocks (FLUX.1: 19 + 38)."""
    shapes = {"img_in": (hidden, 64), "txt_in": (hidden, joint), "final_layer.linear": (64, hidden),
              "final_layer.adaLN_modulation.1": (2 * hidden, hidden)}
    for embedder, width in (("time_in", 256), ("guidance_in", 256), ("vector_in", pooled)):
        shapes |= {f"{embedder}.in_layer": (hidden, width), f"{embedder}.out_layer": (hidden, hidden)}
    for i in range(double):
        for side in ("img", "txt"):
            b = f"double_blocks.{i}.{side}"
            shapes |= {f"{b}_mod.lin": (6 * hidden, hidden), f"{b}_attn.qkv": (3 * hidden, hidden), f"{b}_attn.proj": (hidden, hidden),
                       f"{b}_mlp.0": (mlp, hidden), f"{b}_mlp.2": (hidden, mlp)}
    for i in range(single):
        b = f"single_blocks.{i}"
        shapes |= {f"{b}.linear1": (3 * hidden + mlp, hidden), f"{b}.linear2": (hidden, hidden + mlp), f"{b}.modulation.lin": (3 * hidden, hidden)}
    out = {}
    for name, shape in shapes.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = shape, shape[:1]
    norms = [f"double_blocks.{i}.{side}_attn.norm" for i in range(double) for side in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(single)]
    out |= {f"{n}.{q}_norm.scale": (head,) for n in norms for q in ("query", "key")}
    return out


def fused_lora(base: Path, lora_file: Path) -> dict[str, torch.Tensor]:
    """The base pipeline's denoiser with the LoRA fused in by diffusers itself (load_lora_weights,
    fuse_lora): the reference a LoRA shard's soup must equal."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return {k: v.clone() for k, v in denoiser.state_dict().items()}
