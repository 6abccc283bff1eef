"""Configs for the well-known families, shipped, so that a single-file base loads offline with no `config:`.

`configs/<family>/` holds the small diffusers config files of SD 1.x (SD 1.5's), SD 2.x (SD 2.1's,
768 px, v-prediction) and SDXL base 1.0; `configs/clip-tokenizer/` the CLIP BPE vocabulary and merges
(rebuilt offline from open-clip-torch's, see `configs/build_clip_tokenizer.py`), shared by every
tokenizer of these families. `config_folder` assembles a family's folder, as diffusers'
`from_single_file(config=...)` reads it, in the user's cache. The family of a single file is read from
its header: SDXL by its second text encoder (`conditioner.embedders.1.*`) or its `label_emb`, and
every family by the width of the UNet's cross-attention (768, 1024 or 2048)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoints import CheckpointError, read_header

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def single_file_family(path: str | Path) -> str:
    """"sd1", "sd2" or "sdxl" for an original-LDM single file (header only); CheckpointError otherwise."""
    from .formats import cross_attention_width

    path = Path(path)
    header = read_header(path)
    if any(k.startswith("conditioner.embedders.1.") for k in header) or "model.diffusion_model.label_emb.0.0.weight" in header:
        return "sdxl"
    width = cross_attention_width(header)
    family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
    if family is None:
        seen = f"{width}-wide cross-attention" if width else "no UNet cross-attention"
        raise CheckpointError(
            f"{path.name}: not a single file of a family with shipped configs (SD 1.x, SD 2.x, SDXL): {seen}; "
            "give `config:` naming a diffusers pipeline folder of its family"
        )
    return family


def config_folder(family: str, cache: Path | None = None) -> Path:
    """The family's config folder (model_index.json, component configs, tokenizers; no weights),
    assembled once from the shipped files in the user's cache and reused."""
    source = CONFIGS / family
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files + [CONFIGS / "clip-tokenizer" / n for n in TOKENIZER_FILES]:
        digest.update(file.name.encode() + file.read_bytes())
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "soup_ui" / "configs"
    out = root / f"{family}-{digest.hexdigest()[:12]}"
    if (out / "model_index.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{family}-"))
    for file in files:
        target = tmp / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        if file.name == "tokenizer_config.json":
            for name in TOKENIZER_FILES:
                shutil.copyfile(CONFIGS / "clip-tokenizer" / name, target.parent / name)
    try:
        tmp.rename(out)
    except OSError:  # another process assembled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_config(base: str | Path, config: str | Path | None) -> Path:
    """The config folder of a preset's base: the base folder itself, the preset's `config:`, or for a
    single file without one, the shipped configs of its family."""
    base = Path(base)
    if not base.is_file():
        return base
    if config is not None:
        return Path(config)
    return config_folder(single_file_family(base))
