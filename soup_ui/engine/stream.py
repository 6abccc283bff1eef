"""File-to-file soups: an export that reads each source tensor once, merges it and writes it.

No pipeline is built and no shard is held: the output file's header is known from the sources'
headers, so it is written first, and then each tensor, in the order the first source stores them,
is read from the K files (with `pread`, not memory-mapped), merged in float32 by the registered
method and appended. Memory is one group of output tensors plus the tensors being read, whatever
K and the model's size; the VAE and text encoder of a single file (the base's) are the only parts
held whole. `python -m soup_ui export` takes this path for the denoiser and single-file formats
when text encoders are not mixed; the result is the studio's export, tensor for tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import StudioError
from ..files import atomic_path
from ..modelfiles import adapters, checkpoints, families, formats
from ..modelfiles.checkpoints import CheckpointError, LazyWeights
from ..modelfiles.ldm_names import LDM_PREFIX, ldm_unet_names
from ..modelfiles.presets import Preset
from . import exports
from .mix import Mix
from .pool import LoraTensors, Shard, Weights

logger = logging.getLogger(__name__)

GROUP_ELEMENTS = 1 << 25  # output elements merged per step (128 MB in float32)
SAFETENSORS_NAMES = {v: k for k, v in checkpoints.SAFETENSORS_DTYPES.items()}


class Checked(LazyWeights):
    """A shard's tensors read on access, each checked finite as it is read (the studio checks a
    whole file before use; a stream checks as it goes, and nothing is left behind if one fails)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = super().__getitem__(name)
        # One sum first (a NaN or Inf makes it so; one pass, no mask), the count only then.
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float32)):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(f"{self.path}: tensor {name!r} holds {bad} NaN or Inf values")
        return tensor


class Writer:
    """A safetensors file written front to back: the header from names, shapes and dtypes, then
    each tensor's bytes in that order (metadata and keys sorted in the header, so the same
    content gives the same bytes)."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]):
        self.order, self.specs, offset = list(specs), specs, 0
        header: dict = {"__metadata__": dict(sorted(metadata.items()))}
        entries = {}
        for name, (shape, dtype) in specs.items():
            size = torch.Size(shape).numel() * dtype.itemsize
            entries[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header.update(dict(sorted(entries.items())))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next]
        shape, dtype = self.specs[name]
        if name != expected or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"writing {name!r} {list(tensor.shape)}; the header expects {expected!r} {list(self.specs[expected][0])} next")
        self.file.write(memoryview(tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).reshape(-1).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise ValueError(f"{len(self.order) - self.next} tensors were not written")
        self.file.close()


def shard_view(preset: Preset, names: set[str], config: Mapping, base_found: checkpoints.Found) -> tuple[dict[str, Shard], Mapping]:
    """The preset's shards named in `names`, each detected and validated against the base (headers
    only) and read on access; and the base's tensors, read on access (a LoRA shard is base + its change)."""
    base_specs = base_found.specs
    base = base_found.convert() if base_found.convert is not None else Checked(base_found.path, "cpu", torch.float32, base_found.names)
    from concurrent.futures import ThreadPoolExecutor

    specs = [spec for spec in preset.shards if spec.name in names]
    founds = {}
    for spec in specs:  # every file checked (headers only) before any is hashed
        founds[spec.name] = formats.detect(spec.path, config, base_specs)
        formats.check_against_base(founds[spec.name], base_specs, spec.name)
    with ThreadPoolExecutor(max_workers=2) as pool:  # hashing releases the GIL: two files at once
        hashes = dict(zip([s.name for s in specs], pool.map(lambda s: checkpoints.sha256_file(s.path), specs)))
    view = {}
    for spec in specs:
        found, sha, signature = founds[spec.name], hashes[spec.name], checkpoints.file_signature(spec.path)
        if found.lora is not None:
            checkpoints.check_finite(spec.path, adapters.tensors(found.lora))
            weights = Weights(spec.path, sha, None, LoraTensors(base, found.lora), signature, found.kind, found.lora, tier="lora")
        elif found.convert is not None:  # an original FLUX / SD3 file: converted with its data
            tensors = found.convert()
            checkpoints.check_finite(spec.path, tensors)
            weights = Weights(spec.path, sha, None, tensors, signature, found.kind)
        else:
            weights = Weights(spec.path, sha, None, Checked(spec.path, "cpu", torch.float32, found.names), signature, found.kind, tier="lean")
        view[spec.name] = Shard(spec.name, weights, spec.weight, spec.description)
    return view, base


def used_names(weights: Mapping[str, float], params: Mapping) -> set[str]:
    """The shards a mix reads: its weights' names and a parameter naming a shard (add-difference's c)."""
    return set(weights) | {str(v) for v in params.values() if isinstance(v, str)}


def family_of(folder: Path, base: Path) -> str:
    """"sd1", "sd2" or "sdxl" for a base (a single file, or a pipeline folder by its text encoders)."""
    if base.is_file():
        return families.single_file_family(base)
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    return "sd2" if text.get("hidden_act") == "gelu" else "sd1"


def architecture(folder: Path, family: str, denoiser_config: Mapping) -> dict[str, str]:
    """modelspec fields from the base's config files (exports.architecture reads them from a pipeline)."""
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = json.loads(scheduler.read_text()).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    vae = json.loads((folder / "vae" / "config.json").read_text())
    # FLUX's transformer names no sample size: its pipeline's default is 128 latents
    size = denoiser_config.get("sample_size", 128 if family == "flux" else 64) * 2 ** (len(vae["block_out_channels"]) - 1)
    distilled = bool(denoiser_config.get("guidance_embeds")) if family == "flux" else None  # schnell is not
    return exports.modelspec(family, prediction, size, distilled)


def base_parts(folder: Path, base: Path, family: str) -> dict[str, torch.Tensor]:
    """The base's VAE and text encoder(s) in LDM naming, fp16: a single file's as it stores them, a
    pipeline folder's through the same converters as the studio's single-file export."""
    from safetensors import safe_open

    if base.is_file():
        keep = ("first_stage_model.", "cond_stage_model.", "conditioner.")
        with safe_open(str(base), "pt") as f:
            parts = {k: f.get_tensor(k) for k in f.keys() if k.startswith(keep)}  # noqa: SIM118
        return {k: v.half() for k, v in parts.items() if v.is_floating_point()}

    def read(files: list[Path]) -> dict[str, torch.Tensor]:
        tensors = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return tensors

    vae = read(checkpoints.weight_files(folder / "vae"))
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    texts = [read(formats.text_encoder_files(folder / c)) for c in ("text_encoder", "text_encoder_2") if (folder / c).is_dir()]
    texts = [{k: v for k, v in t.items() if not k.endswith("position_ids")} for t in texts]
    parts = formats.ldm_parts(vae, vae_config, texts, family)
    return {k: v.half() if v.is_floating_point() else v for k, v in parts.items()}


def export(preset: Preset, weights: Mapping[str, float], method: str, params: Mapping, out: str | Path, fmt: str = "unet",
           dtype: torch.dtype | None = None, overwrite: bool = False, progress: Callable[[float], None] | None = None,
           blocks: Mapping[str, object] | None = None) -> tuple[Path, Mix]:
    """Stream the soup of the preset's shards named in `weights` to `out`: the denoiser in diffusers
    names (`fmt` "unet", in `dtype`, by default the base's stored dtypes) or one fp16 single file in LDM naming ("single-file": UNet +
    the base's VAE and text encoder). Returns the file and the mix it holds."""
    from ..maths.methods import merge_into, restrict

    out, base_path = Path(out), Path(preset.base)
    config, base_found = formats.base_unet(preset.base, preset.config)
    folder = families.base_config(preset.base, preset.config)
    view, base = shard_view(preset, used_names(weights, dict(params or {})), config, base_found)
    try:
        family = "flux" if "guidance_embeds" in config else "sd3" if config.get("_class_name", "").startswith("SD3") else family_of(folder, base_path)
        block_map = families.block_map(family, config, base_found.specs) if blocks else None
        mix = Mix.build(view, weights, method, params, False, blocks, block_map)
        parts = mix.parts()
        names = [n for n in base_found.specs if checkpoints.torch_dtype(base_found.specs[n][1]).is_floating_point]
        first = next(iter(mix.shards)).tensors
        if hasattr(first, "read_order"):
            rank = {n: i for i, n in enumerate(first.read_order())}
            names.sort(key=lambda n: rank.get(n, len(rank)))
        shapes = {n: tuple(base_found.specs[n][0]) for n in names}
        if fmt == "single-file":
            if config.get("_class_name") != "UNet2DConditionModel":
                raise StudioError("a single-file (LDM) export is for SD 1.x, SD 2.x and SDXL; export the denoiser instead")
            rename = {n: LDM_PREFIX + ldm for n, ldm in ldm_unet_names(names, config).items()}
            out_dtype, metadata = torch.float16, exports.merge_metadata_of(mix, architecture(folder, family, config), half=True)
            extra = base_parts(folder, base_path, family)
        elif fmt == "unet":
            rename, extra = {n: n for n in names}, {}
            out_dtype = dtype or {n: checkpoints.torch_dtype(base_found.specs[n][1]) for n in names}
            half = all(d == torch.float16 for d in out_dtype.values()) if isinstance(out_dtype, dict) else out_dtype == torch.float16
            metadata = exports.merge_metadata_of(mix, architecture(folder, family, config), half=half)
        else:
            raise StudioError(f"a streamed export writes 'unet' or 'single-file', not {fmt!r}")
        dtypes = out_dtype if isinstance(out_dtype, dict) else dict.fromkeys(names, out_dtype)
        specs = {rename[n]: (shapes[n], dtypes[n]) for n in names} | {k: (tuple(v.shape), v.dtype) for k, v in extra.items()}
        needs_base = base if mix.method.needs_base or any(p.weights is None for p in parts or ()) else None
        with atomic_path(out, overwrite=overwrite) as tmp:
            writer = Writer(tmp, specs, metadata)
            try:
                done, group = 0, []
                total = sum(torch.Size(s).numel() for s in shapes.values())
                for i, name in enumerate(names):
                    group.append(name)
                    size = sum(torch.Size(shapes[n]).numel() for n in group)
                    if size < GROUP_ELEMENTS and i + 1 < len(names):
                        continue
                    target = {n: torch.empty(shapes[n], dtype=torch.float32) for n in group}
                    merge_into(target, mix.method, mix.params, [s.tensors for s in mix.shards], list(mix.weights), needs_base, fused=False,
                               parts=restrict(parts, group) if parts else None)
                    for n in group:
                        writer.write(rename[n], target[n])
                    done += size
                    group = []
                    if progress is not None:
                        progress(done / total)
                for name, tensor in extra.items():
                    writer.write(name, tensor)
            finally:
                writer.file.close()
            writer.close()
    finally:  # every reader closed when the export ends, however it ends (not when garbage collected)
        for tensors in [*(shard.tensors for shard in view.values()), base]:
            if isinstance(tensors, LazyWeights):
                tensors.close()
    logger.info("streamed %s to %s (%s)", mix.label, out, fmt)
    return out, mix
