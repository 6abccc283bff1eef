"""Build the embedded default: a tiny emoji text-to-image model and one UNet shard per style.

The paper's pipeline at small scale (Biggs et al. 2024, Sec. 3): a base model trained on the
union of the data, then one finetuned UNet per style shard. Every stage writes resumable
checkpoints under --work and skips itself when its output exists, so

    python -m soup_ui.training.recipes.emoji --data ../shared/data/emoji-styles

reproduces `assets/emoji/` end to end (about 2 hours on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import held_out_ids, load_captioned_images, read_metadata, to_model_range
from ..train import (
    TrainConfig,
    autocast,
    diffusion_loss,
    encode_images,
    finetune_unet,
    load_checkpoint,
    train_steps,
)

logger = logging.getLogger(__name__)

STYLES = ["twemoji", "openmoji", "fluent-hc", "noto", "fluent-color", "fluent-flat"]
NAMES = "text_ascii"  # the emoji's name, no style words, typographic quotes mapped to ASCII
# Half the samples are captioned with the name alone, half with the name and the dataset's subcategory
# ("grinning face, face-smiling"), which teaches coarse content that 1-3 examples per name cannot.
CAPTIONS = "{text_ascii}|{text_ascii}, {subcategory}"


@dataclass(frozen=True)
class Sizes:
    """Model sizes; the comments show the arithmetic that keeps the recipe within CPU budget."""

    image: int = 64  # the dataset's resolution
    vae_channels: tuple = (32, 64, 64)  # 3 blocks -> 2 downsamples -> 16x16x4 latents (1024 numbers per image)
    latent_channels: int = 4
    text_width: int = 128  # also the UNet's cross-attention width
    text_layers: int = 3
    max_tokens: int = 24  # longest caption is 8 words; BOS + EOS + room for split words
    vocab_size: int = 2048
    unet_channels: tuple = (64, 128, 128)  # 5.9M parameters: 12 MB per shard in fp16, ~45 samples/s on 2 cores


@dataclass(frozen=True)
class Budget:
    """Step counts and training settings (times on 2 idle cores at ~45 samples/s).

    v3 (this recipe): VAE 2,000 steps (~9 min), then its decoder alone 4,000 steps on whole images
    (~30 min); base 4,500 steps from scratch (~75 min), then a second
    stage of `base2_steps` that adds the subcategory captions, min-SNR weighting and an EMA (~30 min);
    shards of `shard_steps` each with min-SNR and an EMA (~8 min each). The stages resume from their
    checkpoints, so the recipe can be spread over sessions.
    """

    vae_steps: int = 2000
    vae_batch: int = 32
    vae_crop: int = 32  # random crops make the (fully convolutional) VAE 4x cheaper to train
    decoder_steps: int = 4000  # then the decoder alone, on whole images (the latent space stays as it is)
    decoder_batch: int = 16
    decoder_lr: float = 2e-4
    base_steps: int = 4500
    base_batch: int = 32
    base_lr: float = 3e-4
    base2_steps: int = 2500  # continued base: subcategory captions, min-SNR, EMA
    base2_lr: float = 2e-4
    base3_steps: int = 0  # a third base stage like base2 (--base3-steps), for the base's learning curve
    shard_steps: int = 600
    shard_batch: int = 32
    shard_lr: float = 4e-4  # high for a finetune: the mixed-style base must move to one style
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    snapshots: tuple = (100, 200, 300, 400, 600)  # shard EMA snapshots, for the own-style curve


SIZES, BUDGET = Sizes(), Budget()
DEVICE = torch.device("cpu")  # --device; the stages move models and batches there


def scaled(budget: Budget, k: int, epochs: float = 1.0) -> Budget:
    """Batches k times larger (for a GPU): steps / k, batch * k, rate * sqrt(k); and `epochs` times
    the base's and the shards' training. The VAE keeps its CPU schedule: its 2,000 small steps cost
    about a minute on a GPU, and the first GPU run (250 steps of 256 at the same rate) gave a VAE
    whose round trips lost the openmoji and noto styles (L1 0.12 against 0.055), which capped every
    shard trained on its latents."""
    from dataclasses import replace

    def steps(n: int, more: float = epochs) -> int:
        return max(1, round(n * more / k))

    if k == 1 and epochs == 1:
        return budget
    return replace(
        budget,
        base_steps=steps(budget.base_steps), base_batch=budget.base_batch * k, base_lr=budget.base_lr * k**0.5,
        base2_steps=steps(budget.base2_steps), base2_lr=budget.base2_lr * k**0.5,
        shard_steps=steps(budget.shard_steps), shard_batch=budget.shard_batch * k, shard_lr=budget.shard_lr * k**0.5,
        ema_decay=budget.ema_decay ** k, snapshots=tuple(steps(s) for s in budget.snapshots),
    )


# 1. Tokenizer -------------------------------------------------------------------------------
def build_tokenizer(data: Path, out: Path) -> None:
    """A CLIP BPE tokenizer (vocab.json + merges.txt) learned from the captions' words.

    Built once and shipped: retraining BPE reorders ids, which would scramble a trained text encoder.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    captions = sorted({r[NAMES].lower() for r in read_metadata(data)})
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    # CLIP's own split pattern, so that CLIPTokenizer sees the same words.
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    printable = [chr(c) for c in range(33, 127)]
    trainer = trainers.BpeTrainer(
        vocab_size=SIZES.vocab_size - 2, initial_alphabet=printable, end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(captions, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    # Every printable character must exist alone and word-final, as in CLIP's vocabulary.
    for ch in printable:
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    clip = CLIPTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=SIZES.max_tokens, pad_token="<|endoftext|>"
    )
    clip.save_pretrained(out)
    longest = max(len(clip(c).input_ids) for c in captions)
    if longest > SIZES.max_tokens:
        raise RuntimeError(f"a caption needs {longest} tokens, more than max_tokens={SIZES.max_tokens}")
    logger.info("tokenizer: %d tokens, longest caption %d tokens -> %s", len(vocab), longest, out)


# 2. VAE -------------------------------------------------------------------------------------
def make_vae():
    from diffusers import AutoencoderKL

    n = len(SIZES.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=SIZES.vae_channels,
        layers_per_block=1,
        latent_channels=SIZES.latent_channels,
        norm_num_groups=16,
        sample_size=SIZES.image,
        mid_block_add_attention=False,  # fully convolutional, so training on crops transfers to full images
    )


def train_vae(data: Path, out: Path, work: Path, seed: int = 0) -> None:
    """Train the autoencoder on random crops (L1 + MSE + a small KL), then fix its scaling factor."""
    images = load_captioned_images(data, SIZES.image, caption_column=NAMES).pixels
    torch.manual_seed(seed)
    vae = make_vae().to(DEVICE).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    ckpt = work / "vae"
    start = load_checkpoint(ckpt, {"vae": vae}, optimizer)["step"] if (ckpt / "checkpoint.safetensors").is_file() else 0
    crop = BUDGET.vae_crop

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (BUDGET.vae_batch,), generator=g)
        y, x = torch.randint(0, SIZES.image - crop + 1, (2,), generator=g).tolist()
        batch = to_model_range(images[idx, :, y : y + crop, x : x + crop]).to(DEVICE)
        with autocast(DEVICE):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample
        recon = recon.float()
        return F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().float().mean()

    train_steps("vae", optimizer, loss_at, total=BUDGET.vae_steps, start=start, seed=seed, base_lr=5e-4, warmup=100, ckpt=ckpt, modules={"vae": vae})
    vae = vae.cpu().eval()
    normalize_latents(vae, images)
    with torch.no_grad():
        sample = to_model_range(images[:256])
        err = (vae.decode(vae.encode(sample).latent_dist.mean).sample - sample).abs().mean().item()
    logger.info("vae: scaling_factor %.4f, reconstruction L1 %.4f on [-1, 1]", vae.config.scaling_factor, err)
    vae.save_pretrained(out)


def finetune_decoder(data: Path, vae_folder: Path, work: Path, seed: int = 0) -> None:
    """Train the VAE's decoder further, alone, on whole 64x64 images (L1 + MSE), from posterior samples
    of the frozen encoder: the latent space, and so every UNet trained on it, stays valid.

    Measured (bench/emoji_eval.py's style classifier on round trips of held-out emoji, which this
    stage never sees): the VAE's 2,000 steps on 32x32 crops lost twemoji's flat fills (35% read as
    twemoji after a round trip) and fluent-flat's (52%); 1,000 decoder steps gave 93% and 73%. The crops'
    group-norm statistics differ from whole images', and the decoder had simply not converged."""
    from diffusers import AutoencoderKL

    images = load_captioned_images(data, SIZES.image, caption_column=NAMES)
    held = held_out_ids([r["emoji_id"] for r in images.rows], seed)
    pixels = images.pixels[torch.tensor([r["emoji_id"] not in held for r in images.rows])]
    vae = AutoencoderKL.from_pretrained(vae_folder).to(DEVICE).eval()
    with torch.no_grad():
        mean, std = encode_images(vae, pixels, device=DEVICE)
    target = to_model_range(pixels)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=BUDGET.decoder_lr, weight_decay=0.0)
    ckpt = work / "decoder"
    start = load_checkpoint(ckpt, {"vae": vae}, optimizer)["step"] if (ckpt / "checkpoint.safetensors").is_file() else 0

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(pixels), (BUDGET.decoder_batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        with autocast(DEVICE):
            recon = vae.decode(z.to(DEVICE)).sample.float()
        batch = target[idx].to(DEVICE)
        return F.l1_loss(recon, batch) + F.mse_loss(recon, batch)

    train_steps("decoder", optimizer, loss_at, total=BUDGET.decoder_steps, start=start, seed=seed + 7, base_lr=BUDGET.decoder_lr, warmup=100,
                ckpt=ckpt, modules={"vae": vae})
    vae.cpu().save_pretrained(vae_folder)
    (ckpt / "done").write_text(str(BUDGET.decoder_steps))


@torch.no_grad()
def normalize_latents(vae, images: torch.Tensor, count: int = 2048) -> None:
    """Fold each latent channel's mean and std into the VAE's 1x1 convolutions, so latents are
    zero-mean and unit-variance per channel and scaling_factor is 1.

    White backgrounds give the raw latents large per-channel offsets (here -1.2 to +1.4 against
    stds of 0.2-0.6); diffusion from N(0, 1) noise then drifts (the terminal-SNR problem) and samples
    come out as coloured noise. The StableDiffusionPipeline only knows scaling_factor, so the shift
    lives in quant_conv (encoder side) and post_quant_conv (decoder side): the same autoencoder,
    with normalized latents.
    """
    means, stds = encode_images(vae, images[:count])
    latents = means + stds * torch.randn_like(means)
    m = latents.mean((0, 2, 3))
    s = latents.std((0, 2, 3))
    c = vae.config.latent_channels
    q, p = vae.quant_conv, vae.post_quant_conv
    # Encoder: mean' = (mean - m) / s, logvar' = logvar - 2 log s.
    q.weight[:c] /= s[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * torch.log(s)
    # Decoder sees z = z' * s + m: W' = W diag(s), b' = b + W m.
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight *= s[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
    logger.info("latents normalized: channel means %s, stds %s folded into the VAE", m.tolist(), s.tolist())


def reuse_autoencoder(source: Path, pipeline: Path, work: Path) -> None:
    """Start from another run's tokenizer and finished VAE (e.g. the shipped ones): the GPU run spends its
    minutes on the denoiser, and every UNet it trains shares the shipped latent space."""
    import shutil

    for part in ("tokenizer", "vae"):
        if not (source / part).is_dir():
            raise FileNotFoundError(f"--autoencoder-from {source}: no {part}/ folder")
        if not (pipeline / part).is_dir():
            shutil.copytree(source / part, pipeline / part)
    (work / "decoder").mkdir(parents=True, exist_ok=True)
    (work / "decoder" / "done").write_text(f"reused from {source}\n")
    logger.info("tokenizer and VAE taken from %s", source)


# 3. Base: text encoder + UNet from scratch on all styles -------------------------------------
def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=SIZES.text_width,
        intermediate_size=4 * SIZES.text_width,
        num_hidden_layers=SIZES.text_layers,
        num_attention_heads=4,
        max_position_embeddings=SIZES.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZES.image // 2 ** (len(SIZES.vae_channels) - 1),
        in_channels=SIZES.latent_channels,
        out_channels=SIZES.latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=SIZES.unet_channels,
        layers_per_block=1,
        cross_attention_dim=SIZES.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion's training schedule, so the usual samplers apply unchanged.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        steps_offset=1,
    )


@dataclass(frozen=True)
class BaseStage:
    """One stage of the base's training (text encoder and UNet together, every style)."""

    name: str  # its checkpoint folder under --work
    steps: int
    lr: float
    captions: str  # see data.caption_templates
    min_snr_gamma: float | None = None
    ema_decay: float | None = None
    resume_weights: bool = False  # start from the text encoder and UNet already in the pipeline folder


def base_stages() -> list[BaseStage]:
    return [
        BaseStage("base", BUDGET.base_steps, BUDGET.base_lr, NAMES),
        BaseStage("base2", BUDGET.base2_steps, BUDGET.base2_lr, CAPTIONS, BUDGET.min_snr_gamma, BUDGET.ema_decay, True),
    ] + ([BaseStage("base3", BUDGET.base3_steps, BUDGET.base2_lr, CAPTIONS, BUDGET.min_snr_gamma, BUDGET.ema_decay, True)] if BUDGET.base3_steps else [])


def train_base(data: Path, pipeline: Path, work: Path, stage: BaseStage, seed: int = 0) -> None:
    """Train text encoder and UNet together on every style, captions without style words; writes
    the (EMA, if kept) text encoder and UNet into the pipeline folder."""
    import copy

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..train import EmaWeights

    tokenizer = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    vae = AutoencoderKL.from_pretrained(pipeline / "vae").eval()
    data_set = load_captioned_images(data, SIZES.image, caption_column=stage.captions)
    lat_mean, lat_std = encode_images(vae.to(DEVICE), data_set.pixels, device=DEVICE)
    variants = len(data_set.variants[0])
    flat = [c for v in data_set.variants for c in v]
    ids = tokenizer(flat + [""], padding="max_length", max_length=SIZES.max_tokens, truncation=True, return_tensors="pt").input_ids
    empty = len(flat)

    torch.manual_seed(seed)
    if stage.resume_weights:
        text_encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder").float().train()
        unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").float().train()
    else:
        text_encoder, unet = make_text_encoder(tokenizer).train(), make_unet().train()
    scheduler = make_scheduler()
    text_encoder, unet = text_encoder.to(DEVICE), unet.to(DEVICE)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=1e-2, fused=DEVICE.type == "cuda")  # one kernel per step on a GPU
    modules = {"text_encoder": text_encoder, "unet": unet}
    if stage.ema_decay:  # the EMA covers both trained parts
        averages = {"ema_text_encoder": copy.deepcopy(text_encoder), "ema_unet": copy.deepcopy(unet)}
        modules.update(averages)
    ckpt = work / stage.name
    start = load_checkpoint(ckpt, modules, optimizer)["step"] if (ckpt / "checkpoint.safetensors").is_file() else 0
    emas = []
    if stage.ema_decay:
        emas = [EmaWeights(m, stage.ema_decay, start, averages[f"ema_{k}"]) for k, m in (("text_encoder", text_encoder), ("unet", unet))]
    logger.info("%s: unet %.2fM, text encoder %.2fM parameters", stage.name, *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, text_encoder)))

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data_set.variants), (BUDGET.base_batch,), generator=g)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * vae.config.scaling_factor
        rows = idx * variants + torch.randint(0, variants, (len(idx),), generator=g)
        rows[torch.rand(len(idx), generator=g) < 0.1] = empty  # caption dropout for classifier-free guidance
        with autocast(DEVICE):
            states = text_encoder(ids[rows].to(DEVICE))[0]
        return diffusion_loss(unet, scheduler, latents.to(DEVICE), states, g, stage.min_snr_gamma)

    train_steps(stage.name, optimizer, loss_at, total=stage.steps, start=start, seed=seed, base_lr=stage.lr, warmup=200, ckpt=ckpt,
                modules=modules, clip=params, emas=tuple(zip(emas, (text_encoder, unet))), batch=BUDGET.base_batch)
    if emas:
        text_encoder, unet = (ema.synced() for ema in emas)
    text_encoder, unet = text_encoder.cpu(), unet.cpu()
    text_encoder.eval().save_pretrained(pipeline / "text_encoder")
    unet.eval().to(torch.float16).save_pretrained(pipeline / "unet")
    scheduler.save_pretrained(pipeline / "scheduler")
    (ckpt / "done").write_text(f"{stage.steps}\n")


def write_model_index(pipeline: Path) -> None:
    """Save the parts as one StableDiffusionPipeline folder (no safety checker: emoji only)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(pipeline / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(pipeline / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(pipeline / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(pipeline / "unet", torch_dtype=torch.float16),  # shipped in fp16
        scheduler=DDPMScheduler.from_pretrained(pipeline / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(pipeline)


# 4. Shards: one UNet finetune per style -----------------------------------------------------
def train_shards(data: Path, pipeline: Path, shards: Path, work: Path, styles: list[str], seed: int = 0) -> None:
    for style in styles:
        out = shards / f"{style}.safetensors"
        if out.is_file():
            logger.info("shard %s exists, skipped", style)
            continue
        config = TrainConfig(
            pipeline=str(pipeline),
            data=str(data),
            out=str(out),
            where={"style": style},
            caption_column=CAPTIONS,
            steps=BUDGET.shard_steps,
            batch_size=BUDGET.shard_batch,
            learning_rate=BUDGET.shard_lr,
            warmup_steps=max(1, 20 * 32 // BUDGET.shard_batch),
            min_snr_gamma=BUDGET.min_snr_gamma,
            ema_decay=BUDGET.ema_decay,
            snapshot_steps=tuple(BUDGET.snapshots),
            seed=seed,
            device=str(DEVICE),
            checkpoint_every=min(100, BUDGET.shard_steps),
            checkpoint_dir=str(work / f"shard-{style}"),
        )
        finetune_unet(config, resume=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/emoji-styles"), help="the emoji-styles imagefolder")
    parser.add_argument("--out", type=Path, default=Path("assets/emoji"), help="pipeline/ and shards/ are written here")
    parser.add_argument("--work", type=Path, default=Path(".cache/recipe-emoji"), help="resumable checkpoints")
    parser.add_argument("--stage", choices=["tokenizer", "vae", "decoder", "base", "shards", "judges", "all"], default="all")
    parser.add_argument(
        "--styles", default=",".join(STYLES), help="comma-separated shard styles, in training order (fluent-flat, last, is the near-twin control of fluent-color)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage, to check the recipe runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    parser.add_argument("--batch-multiplier", type=int, default=1, help="batches k times larger, steps k times fewer (same epochs): 8 on a GPU")
    parser.add_argument("--epochs", type=float, default=1.0, help="train the base and the shards this many times longer (the GPU run uses 2)")
    parser.add_argument("--base3-steps", type=int, default=0, help="continue the base this many steps more (stage base3, like base2)")
    parser.add_argument("--shard-steps", type=int, default=0, help="shard steps (0: the budget's)")
    parser.add_argument("--shard-lr", type=float, default=0.0, help="shard learning rate (0: the budget's)")
    parser.add_argument(
        "--autoencoder-from", type=Path, help="take the tokenizer and the finished VAE (decoder stage included) from this pipeline folder instead of training them"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    global BUDGET, DEVICE
    DEVICE = torch.device(args.device)
    BUDGET = scaled(BUDGET, args.batch_multiplier, args.epochs)
    if args.base3_steps or args.shard_steps or args.shard_lr:
        from dataclasses import replace

        BUDGET = replace(
            BUDGET, base3_steps=args.base3_steps, shard_steps=args.shard_steps or BUDGET.shard_steps, shard_lr=args.shard_lr or BUDGET.shard_lr
        )
    if args.smoke:
        BUDGET = Budget(vae_steps=2, decoder_steps=2, base_steps=2, base2_steps=2, shard_steps=2, snapshots=(1,))
    logger.info("budget: %s", BUDGET)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline, shards = args.out / "pipeline", args.out / "shards"
    stages = ["tokenizer", "vae", "decoder", "base", "shards", "judges"] if args.stage == "all" else [args.stage]
    if args.autoencoder_from:
        reuse_autoencoder(args.autoencoder_from, pipeline, args.work)
    if "tokenizer" in stages and not (pipeline / "tokenizer" / "vocab.json").is_file():
        build_tokenizer(args.data, pipeline / "tokenizer")
    if "vae" in stages and not (pipeline / "vae" / "config.json").is_file():
        train_vae(args.data, pipeline / "vae", args.work, args.seed)
    if "vae" in stages and json.loads((pipeline / "vae" / "config.json").read_text())["scaling_factor"] != 1.0:
        from diffusers import AutoencoderKL  # a VAE trained before normalize_latents existed

        vae = AutoencoderKL.from_pretrained(pipeline / "vae").eval()
        normalize_latents(vae, load_captioned_images(args.data, SIZES.image, caption_column=NAMES).pixels)
        vae.save_pretrained(pipeline / "vae")
    if "decoder" in stages and not (args.work / "decoder" / "done").is_file():
        finetune_decoder(args.data, pipeline / "vae", args.work, args.seed)
    if "base" in stages and not (pipeline / "model_index.json").is_file():
        for stage in base_stages():  # each stage leaves a marker; a finished one is skipped
            if not (args.work / stage.name / "done").is_file():
                train_base(args.data, pipeline, args.work, stage, args.seed)
        write_model_index(pipeline)
    if "shards" in stages:
        train_shards(args.data, pipeline, shards, args.work, [s for s in args.styles.split(",") if s], args.seed)
    if "judges" in stages and not (args.out / "judges" / "category.safetensors").is_file():  # the style search's classifiers
        from ..judges import train_judges

        train_judges(args.data, args.out / "judges", args.seed, epochs=1 if args.smoke else 12)


if __name__ == "__main__":
    main()
