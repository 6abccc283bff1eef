"""Finetune the UNet of a diffusers text-to-image pipeline on a captioned image folder.

This is how one shard of a soup is made (the paper's step 1: one finetune per data shard,
text encoder and VAE frozen). Checkpoints are safetensors files, so `--resume` never unpickles.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..files import atomic_path
from .data import load_captioned_images, to_model_range

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one UNet finetune."""

    pipeline: str  # diffusers pipeline folder whose UNet is the starting point
    data: str  # imagefolder with metadata.jsonl
    out: str  # where the finetuned UNet weights go (one .safetensors file)
    where: dict[str, str] = field(default_factory=dict)  # metadata filter, e.g. {"style": "twemoji"}
    caption_column: str = "text"
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # share of empty captions, so classifier-free guidance works
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's choice
    ema_decay: float | None = None  # keep an EMA of the weights (warm-up decay) and save it instead of the raw weights
    snapshot_steps: tuple[int, ...] = ()  # also save the (EMA) weights at these steps, for learning curves
    seed: int = 0
    checkpoint_every: int = 250
    checkpoint_dir: str | None = None  # default: <out>.ckpt/
    save_dtype: str = "float16"
    device: str = "cpu"


def diffusion_loss(unet, noise_scheduler, latents, text_states, generator, min_snr_gamma: float | None = None) -> torch.Tensor:
    """The DDPM training loss: predict the noise (or v) added at a random timestep.

    With `min_snr_gamma`, each sample's loss is weighted by min(SNR, gamma) / SNR (by min(SNR, gamma) /
    (SNR + 1) for v-prediction): Min-SNR weighting, Hang et al. 2023, Eq. 9, which keeps the many
    low-noise steps from dominating the gradient."""
    # Drawn where the generator lives (the CPU), so a run draws the same numbers on any device.
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=generator.device
    ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    with autocast(latents.device):
        pred = unet(noisy, timesteps, text_states).sample
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    snr = compute_snr(noise_scheduler, timesteps).float().to(per_sample.device)
    weight = snr.clamp(max=min_snr_gamma) / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    return (per_sample * weight).mean()


class EmaWeights:
    """An exponential moving average of a module's weights (diffusers' `EMAModel`, with its warm-up
    decay 1 - (1 + step)^-2/3 capped at `decay`), kept in a copy of the module so that it is
    checkpointed, sampled from and saved like the module itself."""

    def __init__(self, module: torch.nn.Module, decay: float, step: int = 0, average: torch.nn.Module | None = None):
        import copy

        from diffusers.training_utils import EMAModel

        self.module = average if average is not None else copy.deepcopy(module)
        self.module.requires_grad_(False).eval()
        self.ema = EMAModel(self.module.parameters(), decay=decay, use_ema_warmup=True, foreach=True)
        self.ema.optimization_step = step

    def update(self, module: torch.nn.Module) -> None:
        self.ema.step(module.parameters())

    def synced(self) -> torch.nn.Module:
        """The averaged module, up to date."""
        self.ema.copy_to(self.module.parameters())
        return self.module



def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); nothing elsewhere (slow on CPUs)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cosine_schedule(optimizer, base_lr: float, warmup: int, total: int, start: int = 0):
    """transformers' cosine schedule with linear warm-up, decaying to 10% of the base rate; the rate of
    loop step s is the schedule's at s + 1 (the first step trains at base_lr / warmup, not at 0), and a
    resumed run continues where it stopped."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=0.1, last_epoch=start)


def train_steps(name: str, optimizer, loss_at, *, total: int, start: int, seed: int, base_lr: float, warmup: int, ckpt: Path,
                modules: dict[str, torch.nn.Module], clip: list | None = None, emas: tuple = (), batch: int = 0, save_every: int = 250,
                extra: dict | None = None, after=None, disable: bool = False) -> None:
    """The one training loop of every stage: for steps start..total, `loss_at(step, generator)` (the
    generator depends on seed and step only, so a resumed run draws what an unbroken one would), a
    backward pass, gradients of `clip` clipped to norm 1, the optimizer and the cosine schedule, the
    EMAs ((EmaWeights, module) pairs) updated, a log line every 50 steps and a resumable checkpoint
    of `modules` every `save_every` and at the end; `after(step)` once each step is done."""
    schedule = cosine_schedule(optimizer, base_lr, warmup, total, start)
    bar = tqdm(range(start, total), initial=start, total=total, desc=name, disable=disable)
    t0, losses = time.time(), []
    for step in bar:
        loss = loss_at(step, step_generator(seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        optimizer.step()
        schedule.step()
        for ema, module in emas:
            ema.update(module)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            mean = sum(losses[-50:]) / len(losses[-50:])
            bar.set_postfix(loss=f"{mean:.4f}")
            rate = f" ({50 * batch / (time.time() - t0):.1f} samples/s)" if batch else ""
            logger.info("%s step %d loss %.4f%s", name, step + 1, mean, rate)
            t0 = time.time()
        if (step + 1) % save_every == 0 or step + 1 == total:
            for ema, _ in emas:
                ema.synced()
            save_checkpoint(ckpt, modules, optimizer, step + 1, extra)
        if after is not None:
            after(step + 1)


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """A generator that depends only on (seed, step), so a resumed run draws what an unbroken one would."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, step: int, extra: dict | None = None):
    """Write modules and the optimizer state as safetensors (no pickle), atomically."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in modules.items():
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().contiguous().cpu()
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).contiguous().cpu()
    meta = {"step": step, "param_groups": state["param_groups"], **(extra or {})}
    with atomic_path(path / "checkpoint.safetensors", overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    logger.info("checkpoint at step %d -> %s", step, path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer) -> dict:
    """Restore what `save_checkpoint` wrote; returns its metadata (with "step")."""
    from safetensors import safe_open

    file = path / "checkpoint.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(str(file))
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(sub)
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            opt_state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    logger.info("resumed from %s at step %d", file, meta["step"])
    return meta


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, batch_size: int = 256, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for every image (cached once; sampled per step)."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(to_model_range(pixels[start : start + batch_size]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], device="cpu") -> torch.Tensor:
    """Text-encoder hidden states, as the Stable Diffusion pipeline computes them."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def finetune_unet(config: TrainConfig, resume: bool = False, disable_progress: bool = False) -> Path:
    """Finetune the pipeline's UNet on the (filtered) image folder; returns the weights file."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    out = Path(config.out)
    ckpt_dir = Path(config.checkpoint_dir or f"{out}.ckpt")

    # 1. Load the frozen parts and the UNet to train.
    tokenizer = CLIPTokenizer.from_pretrained(config.pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(config.pipeline, subfolder="text_encoder", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(config.pipeline, subfolder="vae", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(config.pipeline, subfolder="unet", use_safetensors=True)
    noise_scheduler = DDPMScheduler.from_pretrained(config.pipeline, subfolder="scheduler")
    for module in (text_encoder, vae, unet):
        module.to(device=device, dtype=torch.float32)
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    unet.train()

    # 2. Cache latents and text states: both encoders are frozen, so each is computed once.
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    data = load_captioned_images(config.data, size, config.where, config.caption_column)
    lat_mean, lat_std = encode_images(vae, data.pixels, device=device)
    scale = vae.config.scaling_factor
    unique = sorted({c for v in data.variants for c in v})
    position = {c: i for i, c in enumerate(unique)}
    caption_index = torch.tensor([[position[c] for c in v] for v in data.variants])  # (images, variants)
    text_states = encode_captions(tokenizer, text_encoder, unique + [""], device=device)
    empty_index = len(unique)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-2, fused=device.type == "cuda")
    modules = {"unet": unet}
    average = None
    if config.ema_decay:
        average = copy.deepcopy(unet)
        modules["ema"] = average
    start = 0
    if resume and (ckpt_dir / "checkpoint.safetensors").is_file():
        start = load_checkpoint(ckpt_dir, modules, optimizer)["step"]
    ema = EmaWeights(unet, config.ema_decay, start, average) if config.ema_decay else None

    # 3. Train.
    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data.captions), (config.batch_size,), generator=g)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scale  # on the CPU
        variant = torch.randint(0, caption_index.shape[1], (len(idx),), generator=g)
        cap = caption_index[idx, variant]
        cap[torch.rand(len(idx), generator=g) < config.caption_dropout] = empty_index
        return diffusion_loss(unet, noise_scheduler, latents.to(device), text_states[cap.to(device)], g, config.min_snr_gamma)

    def snapshot(step: int) -> None:
        if step in config.snapshot_steps:
            write_unet(ema.synced() if ema else unet, ckpt_dir / f"snapshot-{step}.safetensors", config, step)

    train_steps("finetune", optimizer, loss_at, total=config.steps, start=start, seed=config.seed, base_lr=config.learning_rate,
                warmup=config.warmup_steps, ckpt=ckpt_dir, modules=modules, clip=list(unet.parameters()), emas=((ema, unet),) if ema else (),
                batch=config.batch_size, save_every=config.checkpoint_every, extra={"config": asdict(config)}, after=snapshot, disable=disable_progress)

    # 4. Write the shard: UNet weights only (the EMA's, if kept), in the UNet's own tensor names.
    write_unet(ema.synced() if ema else unet, out, config, config.steps)
    return out


def write_unet(unet: torch.nn.Module, out: Path, config: TrainConfig, step: int) -> None:
    """The UNet's weights as one .safetensors file in `config.save_dtype`, with the training
    settings in its metadata; written to a temporary name, then renamed."""
    dtype = getattr(torch, config.save_dtype)
    weights = {k: v.detach().to(dtype).contiguous().cpu() for k, v in unet.state_dict().items()}
    with atomic_path(out, overwrite=True) as tmp:
        save_file(weights, str(tmp), metadata={"soup_ui.training.train": json.dumps({**asdict(config), "step": step})})
    logger.info("wrote %s (step %d)", out, step)
