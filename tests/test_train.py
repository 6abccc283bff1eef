"""The shard trainer: resume equals an unbroken run, the schedule, filters, captions, EMA and min-SNR."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from soup_ui.training import train
from soup_ui.training.data import caption_templates, load_captioned_images, parse_where, read_metadata
from soup_ui.training.train import TrainConfig, cosine_schedule, finetune_unet


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """Twelve 16x16 images in two styles, imagefolder layout, with name and subcategory columns."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        style = "flat" if i % 2 else "outline"
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": ["a red apple", "a cat face", "a blue car"][i % 3], "style": style, "sub": f"group-{i % 2}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def config(tiny_preset, imagefolder, out, **over):
    return TrainConfig(
        pipeline=str(tiny_preset.parent / "base"), data=str(imagefolder), out=str(out), where={"style": "flat"},
        caption_column="{text}|{text}, {sub}", steps=6, batch_size=4, learning_rate=1e-3, warmup_steps=2,
        checkpoint_every=3, min_snr_gamma=5.0, ema_decay=0.9, snapshot_steps=(3,), **over,
    )


def test_a_resumed_run_equals_an_unbroken_one(tiny_preset, imagefolder, tmp_path, monkeypatch):
    unbroken = finetune_unet(config(tiny_preset, imagefolder, tmp_path / "a.safetensors"), disable_progress=True)

    real_save = train.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    broken = config(tiny_preset, imagefolder, tmp_path / "b.safetensors")
    with pytest.raises(KeyboardInterrupt):
        finetune_unet(broken, disable_progress=True)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = finetune_unet(broken, resume=True, disable_progress=True)
    a, b = load_file(str(unbroken)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_preset.parent / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k].float(), base[k].float()) for k in a)  # it trained
    snapshot = tmp_path / "a.safetensors.ckpt" / "snapshot-3.safetensors"
    assert snapshot.is_file() and not all(torch.equal(load_file(str(snapshot))[k], a[k]) for k in a)


def test_the_ema_is_what_is_saved(tiny_preset, imagefolder, tmp_path):
    raw = finetune_unet(replace(config(tiny_preset, imagefolder, tmp_path / "raw.safetensors"), ema_decay=None), disable_progress=True)
    ema = finetune_unet(config(tiny_preset, imagefolder, tmp_path / "ema.safetensors"), disable_progress=True)
    base = load_file(str(tiny_preset.parent / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    r, e = load_file(str(raw)), load_file(str(ema))
    moved_raw = sum((r[k].float() - base[k].float()).abs().sum() for k in r)
    moved_ema = sum((e[k].float() - base[k].float()).abs().sum() for k in e)
    assert 0 < moved_ema < moved_raw  # the average lags the raw weights


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 500, 999])
    snr = compute_snr(scheduler, t)
    assert snr[0] > 5 > snr[2]  # low noise is clamped, high noise is not

    class Echo(torch.nn.Module):
        def forward(self, noisy, timesteps, states):
            return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    latents = torch.zeros(64, 4, 2, 2)
    weighted = train.diffusion_loss(Echo(), scheduler, latents, None, torch.Generator().manual_seed(0), min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)  # the same draws, by hand
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    snr = compute_snr(scheduler, t)
    expected = (noise.square().mean((1, 2, 3)) * snr.clamp(max=5.0) / snr).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (snr > 5).any() and (snr < 5).any()  # both sides of the clamp were drawn


def test_learning_rate_schedule_is_transformers_cosine_with_warm_up_and_resumes_where_it_stopped():
    def rates(start: int, steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = cosine_schedule(optimizer, 1.0, 10, 100, start)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    unbroken = rates(0, 100)
    assert unbroken[0] == pytest.approx(0.1) and unbroken[9] == pytest.approx(1.0)  # the first step trains at base / warm-up
    assert unbroken[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))  # step 54 is the schedule's 55
    assert unbroken[99] == pytest.approx(0.1)  # the last step: down to 10% of the base rate
    assert rates(37, 20) == pytest.approx(unbroken[37:57])  # resumed at step 37: what the unbroken run had


def test_where_filters_and_their_errors(imagefolder):
    assert parse_where(["style=flat", "note=a=b"]) == {"style": "flat", "note": "a=b"}
    with pytest.raises(ValueError, match="filter 'style' must look like COLUMN=VALUE"):
        parse_where(["style"])
    assert len(read_metadata(imagefolder, {"style": "flat"})) == 6
    with pytest.raises(ValueError, match=r"no column 'colour'; columns are \['file_name', 'style', 'sub', 'text'\]"):
        read_metadata(imagefolder, {"colour": "red"})
    with pytest.raises(ValueError, match=r"no rows match \{'style': 'watercolor'\}"):
        read_metadata(imagefolder, {"style": "watercolor"})


def test_caption_templates(imagefolder):
    assert caption_templates("text") == ["{text}"]
    assert caption_templates("{text}|{text}, {sub}") == ["{text}", "{text}, {sub}"]
    data = load_captioned_images(imagefolder, 16, {"style": "flat"}, "{text}|{text}, {sub}")
    assert data.variants[0] == ("a cat face", "a cat face, group-1") and data.captions[0] == "a cat face"
    with pytest.raises(ValueError, match=r"caption template '\{colour\}' needs a column the rows lack"):
        load_captioned_images(imagefolder, 16, None, "colour")


def test_the_gpu_budget_keeps_the_samples_seen_and_scales_epochs():
    from soup_ui.training.recipes.emoji import Budget, scaled

    cpu = Budget()
    gpu = scaled(cpu, 8, epochs=2)
    assert gpu.base_steps * gpu.base_batch == 2 * cpu.base_steps * cpu.base_batch
    assert gpu.shard_steps * gpu.shard_batch == 2 * cpu.shard_steps * cpu.shard_batch
    assert (gpu.vae_steps, gpu.vae_batch) == (cpu.vae_steps, cpu.vae_batch)  # the VAE's schedule unchanged
    assert (gpu.decoder_steps, gpu.decoder_batch) == (cpu.decoder_steps, cpu.decoder_batch)  # and its decoder's
    assert gpu.snapshots == tuple(s * 2 // 8 for s in cpu.snapshots) and gpu.snapshots[-1] == gpu.shard_steps
    assert gpu.ema_decay == pytest.approx(cpu.ema_decay**8)  # the same averaging horizon in samples
    assert scaled(cpu, 1) is cpu


def test_the_held_out_emoji_are_one_in_ten_and_fixed_by_the_seed():
    from soup_ui.training.data import held_out_ids

    ids = [f"e{i:04d}" for i in range(1595)]
    held = held_out_ids(list(reversed(ids)), seed=0)
    assert len(held) == 159 and held == held_out_ids(ids, seed=0)  # order of the input does not matter
    assert held != held_out_ids(ids, seed=1)


def test_the_recipe_can_start_from_a_finished_autoencoder(tmp_path):
    """--autoencoder-from: the tokenizer and VAE are copied, the decoder stage counts as done, and a
    folder that lacks one says which."""
    from soup_ui.training.recipes.emoji import reuse_autoencoder

    source = tmp_path / "shipped"
    for part in ("tokenizer", "vae"):
        (source / part).mkdir(parents=True)
        (source / part / "config.json").write_text(f'{{"part": "{part}"}}')
    pipeline, work = tmp_path / "run" / "pipeline", tmp_path / "run" / "work"
    reuse_autoencoder(source, pipeline, work)
    assert (pipeline / "vae" / "config.json").read_text() == '{"part": "vae"}'
    assert (pipeline / "tokenizer" / "config.json").read_text() == '{"part": "tokenizer"}'
    assert (work / "decoder" / "done").read_text().startswith("reused from")
    with pytest.raises(FileNotFoundError, match=r"--autoencoder-from .*empty: no tokenizer/ folder"):
        reuse_autoencoder(tmp_path / "empty", tmp_path / "other", work)
