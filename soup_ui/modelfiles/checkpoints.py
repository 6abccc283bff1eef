"""Reading UNet weights from disk: safetensors only, validated once, at load.

A shard is either a diffusers `unet/` folder (diffusion_pytorch_model.safetensors, possibly
sharded with an index) or one `.safetensors` file of UNet weights. Pickle checkpoints are
refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"}


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype name such as "F16"."""
    return SAFETENSORS_DTYPES[name.upper()]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) holding the denoiser weights at `path`: a file, a diffusers `unet/` or
    `transformer/` folder (one file, sharded with an index, or a variant such as
    `diffusion_pytorch_model.fp16.safetensors`) or a whole pipeline folder (its `unet/` or `transformer/`)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refused: {path.suffix} is a pickle checkpoint, and loading it could run arbitrary code; "
            "convert it to .safetensors first"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file (only safetensors checkpoints are read)")
        return [path]
    if (path / "model_index.json").is_file():
        for denoiser in ("unet", "transformer"):
            if (path / denoiser).is_dir():
                return weight_files(path / denoiser)
        raise CheckpointError(f"{path}: a pipeline folder without a unet/ or transformer/ (no denoiser this studio soups)")
    for index in [path / "diffusion_pytorch_model.safetensors.index.json", *sorted(path.glob("diffusion_pytorch_model.safetensors.index.*.json"))]:
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / n for n in names]
    for single in [path / "diffusion_pytorch_model.safetensors", *sorted(path.glob("diffusion_pytorch_model.*.safetensors"))]:
        if single.is_file():
            return [single]
    lora = path / "pytorch_lora_weights.safetensors"  # a LoRA folder as diffusers' save_lora_weights writes it
    if lora.is_file():
        return [lora]
    pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights here ({', '.join(pickles)}), refused because unpickling can run "
            "arbitrary code; save the UNet with safe_serialization=True"
        )
    raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors in this folder")


def file_variant(file: Path) -> str | None:
    """The variant in a diffusers weights file's name (`diffusion_pytorch_model.fp16.safetensors`: "fp16"), or None."""
    match = re.fullmatch(r"diffusion_pytorch_model[^.]*\.(\w+)\.safetensors", Path(file).name)
    return match.group(1) if match else None


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header, without reading the data."""
    try:
        with safe_open(str(file), "pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as err:
        pickled = pickle_kind(file)
        if pickled:
            raise CheckpointError(
                f"{file}: {pickled} under a .safetensors name; refused, never unpickled (loading it could run arbitrary code): "
                "convert it to safetensors first"
            ) from None
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def pickle_kind(file: Path) -> str | None:
    """What pickle data a file holds, read from its first bytes only (never unpickled): a PyTorch
    checkpoint (torch.save's zip, its `data.pkl` inside) or a bare pickle (protocol 2 to 5), else None."""
    try:
        with open(file, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") and b"data.pkl" in head:
        return "a PyTorch checkpoint (torch.save's zipped pickle)"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a pickle (protocol {head[1]})"
    return None


def data_ranges(file: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first, last + 1) byte of its data in a safetensors file (read from the JSON header)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    start = 8 + size
    return {n: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for n, v in header.items() if n != "__metadata__"}


def tensor_specs(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor of the UNet at `path`."""
    specs = {}
    for file in weight_files(path):
        specs.update(read_header(file))
    return specs


def load_weights(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of the UNet at `path`, optionally cast, and check that all are finite."""
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    check_finite(path, out)
    for key, tensor in out.items():
        out[key] = tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype)
    return out


class PinnedTensors(Mapping):
    """A shard's tensors held in CPU memory (page-locked when CUDA is there, so that copies to the GPU
    run at full speed and asynchronously) and copied to `device` one tensor at a time as the soup
    reads them: the GPU holds one source tensor at a time, not the shard."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: str | torch.device):
        pin = torch.cuda.is_available() and torch.device(device).type == "cuda"
        self.host = {k: (v.pin_memory() if pin else v) for k, v in tensors.items()}
        self.device, self.pinned = torch.device(device), pin

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.host[name].to(self.device, non_blocking=True)

    def __iter__(self):
        return iter(self.host)

    def __len__(self) -> int:
        return len(self.host)


class LazyWeights(Mapping):
    """A UNet's tensors read from memory-mapped safetensors on access, one at a time ("lean" mode).

    Souping from these keeps only the target and the tensor being read resident, so shards that
    would not fit in (GPU) memory can still be mixed. Validate with `formats.check_against_base` first.
    """

    # Bytes to ask the kernel to read ahead after each tensor. A soup reads K files in step; on this
    # project's machine, reading 4 files interleaved in 32 MB pieces ran at 0.7x the disk's
    # sequential speed, in 256 MB pieces at 1.0x (bench/RESULTS.md, lean mode).
    READ_AHEAD = 256 << 20

    def __init__(
        self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        names: Mapping[str, tuple[Path, str]] | None = None,
    ):
        """`names`: tensor name -> (file, name stored in that file), for checkpoints in another
        naming (see `formats`); by default every tensor of the files at `path`, as stored."""
        self.path = Path(path)
        self.device, self.dtype = device, dtype
        self._where: dict[str, tuple[Path, str]] = {}
        self._ranges: dict[str, tuple[int, int]] = {}
        self.specs: dict[str, tuple[tuple[int, ...], str]] = {}
        headers, ranges = {}, {}
        files = weight_files(path) if names is None else list(dict.fromkeys(f for f, _ in names.values()))
        for file in files:
            headers[file], ranges[file] = read_header(file), data_ranges(file)
        if names is None:
            names = {n: (file, n) for file in files for n in headers[file]}
        for name, (file, stored) in names.items():
            self._where[name] = (file, stored)
            self.specs[name] = headers[file][stored]
            self._ranges[name] = ranges[file][stored]
        self._fds: dict[Path, int] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name][0]

    def read_order(self) -> list[str]:
        """Names in the order their data lies on disk: reading in this order is sequential."""
        files = list(dict.fromkeys(f for f, _ in self._where.values()))
        return sorted(self.specs, key=lambda n: (files.index(self._where[n][0]), self._ranges[n][0]))

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def _read_ahead(self, file: Path, offset: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(file), offset, self.READ_AHEAD, os.POSIX_FADV_WILLNEED)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor, read with pread into memory of its own (not memory-mapped: pages mapped from
        K files would stay in the process's resident memory), then cast and moved."""
        file, _ = self._where[name]
        (start, end), (shape, dtype_name) = self._ranges[name], self.specs[name]
        fd = self._fd(file)
        self._read_ahead(file, end)
        raw = torch.empty(end - start, dtype=torch.uint8)
        view, done = memoryview(raw.numpy()), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(f"{file}: tensor {name!r} ends past the end of the file")
            done += n
        tensor = raw.view(torch_dtype(dtype_name)).reshape(shape)
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        getattr(self, "_fds", {}).clear()

    def __del__(self):
        self.close()

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name) -> bool:
        return name in self.specs


def check_finite(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first tensor that holds NaN or Inf."""
    for key in tensors:
        tensor = tensors[key]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {key!r} holds {bad} NaN or Inf values")


def sha256_file(path: str | Path) -> str:
    """Content hash of a weights file or of every weights file of a folder (in name order)."""
    return sha256_files(weight_files(path))


def sha256_files(files: list[Path]) -> str:
    """Content hash of these files, in this order."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            hashlib.file_digest(f, lambda: digest)  # feeds the one digest, file after file
    return digest.hexdigest()


def file_signature(path: str | Path) -> tuple:
    """(name, size, mtime, inode) of each weights file: changes whenever a file is rewritten."""
    out = []
    for file in weight_files(path):
        st = file.stat()
        out.append((file.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


@dataclass
class Found:
    """A checkpoint as detected: what it is, where each UNet tensor is stored, what was left out."""

    path: Path
    kind: str  # for people: "diffusers UNet", "LDM single-file checkpoint (full: VAE, text encoder)", ...
    files: list[Path]
    names: dict[str, tuple[Path, str]] = field(default_factory=dict)  # diffusers name -> (file, stored name)
    specs: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # diffusers name -> (shape, dtype)
    ignored: Counter = field(default_factory=Counter)  # what kind of tensor -> how many were left out
    lora: dict | None = None  # an adapter (LoRA, DoRA...): base tensor name -> what it changes there (an adapters.Adapter)
    convert: Callable[[], dict[str, torch.Tensor]] | None = None  # an original transformer file: read and convert it (not a renaming)

    def describe_ignored(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in self.ignored.items())
