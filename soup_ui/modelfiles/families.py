"""The model families the studio soups, and the configs shipped for single-file bases.

`FAMILIES` is the one table of what differs between families (keyed by the diffusers pipeline
class a base's model_index.json names): which component is the denoiser that is souped, its text
encoders, how prompts are encoded and which embeddings the pipeline takes, whether latents are
packed, whether negative prompts and classifier-free guidance apply, and the page's defaults.

Configs for the well-known families are shipped, so that a single-file base loads offline with no `config:`.

`configs/<family>/` holds the small diffusers config files of SD 1.x (SD 1.5's), SD 2.x (SD 2.1's,
768 px, v-prediction) and SDXL base 1.0; `configs/clip-tokenizer/` the CLIP BPE vocabulary and merges
(rebuilt offline from open-clip-torch's, see `configs/build_clip_tokenizer.py`), shared by every
tokenizer of these families. `config_folder` assembles a family's folder, as diffusers'
`from_single_file(config=...)` reads it, in the user's cache. The family of a single file is read from
its header: SDXL by its second text encoder (`conditioner.embedders.1.*`) or its `label_emb`, and
every family by the width of the UNet's cross-attention (768, 1024 or 2048)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import CheckpointError, read_header
from .ldm_names import ldm_unet_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}


@dataclass(frozen=True)
class Family:
    """What the studio needs to know about one kind of pipeline."""

    name: str  # for people
    pipeline: str  # the diffusers pipeline class
    denoiser: str  # the pipeline component that is souped: "unet" or "transformer"
    denoiser_class: str  # its diffusers model class (the pipeline's `lora_state_dict` reads its LoRAs)
    text_encoders: tuple[str, ...]  # components mixed under "text encoders too"
    embeddings: tuple[str | None, ...]  # encode_prompt's outputs, named as the pipeline's arguments (None: not passed)
    encode_args: dict = field(default_factory=dict)  # extra arguments of encode_prompt
    negative_prompt: bool = True  # negative prompts and classifier-free guidance apply
    flow_matching: bool = False  # sampled with its own flow-matching scheduler only
    packed: bool = False  # latents packed into 2x2 patches: the pipeline's own prepare_latents makes the noise
    long_tokenizer: str | None = None  # the T5 tokenizer whose length limits a prompt (CLIP's truncate)
    max_tokens: int | None = None  # the pipeline's max_sequence_length for that tokenizer
    load_args: dict = field(default_factory=dict)  # extra from_pretrained / from_single_file arguments
    defaults: dict = field(default_factory=dict)  # the page's render defaults: steps, guidance, scheduler (the size is the denoiser's native one)


SD_EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds")
POOLED_EMBEDDINGS = (*SD_EMBEDDINGS, "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
FAMILIES = {
    f.pipeline: f
    for f in (
        Family("SD 1.x / 2.x", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", ("text_encoder",), SD_EMBEDDINGS,
               load_args=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
               defaults=dict(steps=25, guidance_scale=7.5, scheduler="dpm++")),
        Family("SDXL", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", ("text_encoder", "text_encoder_2"), POOLED_EMBEDDINGS,
               load_args=dict(add_watermarker=False), defaults=dict(steps=30, guidance_scale=6.0, scheduler="dpm++")),
        Family("SD3 / 3.5", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", ("text_encoder", "text_encoder_2", "text_encoder_3"),
               POOLED_EMBEDDINGS, encode_args=dict(prompt_2=None, prompt_3=None), flow_matching=True, long_tokenizer="tokenizer_3",
               max_tokens=256, defaults=dict(steps=28, guidance_scale=7.0, scheduler="default")),
        Family("FLUX.1", "FluxPipeline", "transformer", "FluxTransformer2DModel", ("text_encoder", "text_encoder_2"), ("prompt_embeds", "pooled_prompt_embeds", None),
               encode_args=dict(prompt_2=None), negative_prompt=False, flow_matching=True, packed=True, long_tokenizer="tokenizer_2",
               max_tokens=512, defaults=dict(steps=28, guidance_scale=3.5, scheduler="default")),
    )
}
SD = FAMILIES["StableDiffusionPipeline"]


def of_denoiser(config: dict) -> Family:
    """The family a denoiser config belongs to, by its `_class_name` (any UNet: SD's, whose
    `lora_state_dict` also reads SDXL LoRAs given the UNet's config)."""
    return next((f for f in FAMILIES.values() if f.denoiser_class == config.get("_class_name")), SD)


SUPPORTED = ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())


def denoiser_component(folder: str | Path) -> str:
    """The denoiser sub-folder of a pipeline (or config) folder: "transformer" or "unet"."""
    return "transformer" if (Path(folder) / "transformer").is_dir() else "unet"


BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # by the UNet's cross-attention (text) width


def cross_attention_width(specs: Mapping[str, tuple], lora: bool = False) -> int | None:
    """The text width a UNet (or a LoRA of one) attends to: the input width of a cross-attention key
    projection (`attn2.to_k`, in diffusers', LDM's and kohya's spellings)."""
    for name, spec in specs.items():
        flat = name.replace("_", ".")
        if "attn2.to.k" in flat and flat.endswith("weight") and len(spec[0]) > 1 and (not lora or "lora.down" in flat or "lora.A" in flat):
            return int(spec[0][1])
    return None


ARCHITECTURES = {  # modelspec.architecture
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-v3-medium", "flux": "flux-1-dev",
}
LDM_FAMILIES = ("sd1", "sd2", "sdxl")  # those with an original single-file layout written by `ldm_checkpoint`
TEXT_PREFIXES = {
    "sd1": [("clip", "cond_stage_model.transformer.")],
    "sd2": [("open_clip", "cond_stage_model.model.")],
    "sdxl": [("clip", "conditioner.embedders.0.transformer."), ("open_clip", "conditioner.embedders.1.model.")],
}


def single_file_family(path: str | Path) -> str:
    """"sd1", "sd2" or "sdxl" for an original-LDM single file (header only); CheckpointError otherwise."""
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


# -- blocks: where in the denoiser a weight acts ------------------------------------------------------
# Block IDs as the tools people know name them: A1111's MBW and SuperMerger for UNets (in LDM naming,
# reached through `ldm_names.ldm_unet_names`, which diffusers' own converter proves), ComfyUI's
# ModelMergeSD3 / ModelMergeFlux1 for the transformers (Stability's and Black Forest Labs' module
# names). SuperMerger's rule for the UNet tensors outside the numbered blocks: the time (and SDXL's
# label) embedding goes with BASE, the text encoder's block; the final norm and conv with the last
# output block.
LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")
SD3_BLOCKS = [  # diffusers prefix -> SD3's own module (ComfyUI's ModelMergeSD3 inputs)
    ("pos_embed.pos_embed", "pos_embed"), ("pos_embed.", "x_embedder"), ("context_embedder.", "context_embedder"),
    ("time_text_embed.text_embedder.", "y_embedder"), ("time_text_embed.timestep_embedder.", "t_embedder"),
    ("norm_out.", "final_layer"), ("proj_out.", "final_layer"),
]
FLUX_BLOCKS = [  # diffusers prefix -> FLUX.1's own module (ComfyUI's ModelMergeFlux1 inputs)
    ("x_embedder.", "img_in"), ("context_embedder.", "txt_in"), ("time_text_embed.timestep_embedder.", "time_in"),
    ("time_text_embed.text_embedder.", "vector_in"), ("time_text_embed.guidance_embedder.", "guidance_in"),
    ("norm_out.", "final_layer"), ("proj_out.", "final_layer"),
]
NUMBERED = {  # diffusers' numbered blocks -> the original's, per family
    "sd3": [("transformer_blocks.", "joint_blocks.")],
    "flux": [("transformer_blocks.", "double_blocks."), ("single_transformer_blocks.", "single_blocks.")],
}


@dataclass(frozen=True)
class Blocks:
    """A denoiser's blocks: their IDs in the family's order (SuperMerger's, for a bare list of
    values), the block of every denoiser tensor, the named groups, and the block that also weights
    the text encoders (BASE, UNet families only)."""

    family: str
    ids: tuple[str, ...]
    of: Mapping[str, str] = field(repr=False)  # denoiser tensor name (diffusers) -> block ID
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    text: str | None = None
    sweep: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the block sweep's groups: (label, blocks) in order, covering every block

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def _positions(self) -> dict[str, int]:
        return {b: i for i, b in enumerate(self.ids)}

    def members(self) -> dict[str, list[str]]:
        """Block ID -> its tensors, in block order."""
        out: dict[str, list[str]] = {b: [] for b in self.ids}
        for name, block in self.of.items():
            out[block].append(name)
        return out

    def order(self, names) -> list[str]:
        """`names` sorted by block (stable inside a block): the layout of flat buffers, so that each
        block is one contiguous range."""
        rank = self._positions
        return sorted(names, key=lambda n: rank[self.of[n]] if n in self.of else len(rank))

    @property
    def outline(self) -> str:
        """The IDs in order, numbered runs shortened: "BASE, IN00-IN11, M00, OUT00-OUT11", "double_blocks.0-18"."""
        runs: list[list[str]] = []
        for b in self.ids:
            head, num = _split_number(b)
            if runs and num is not None and _split_number(runs[-1][-1]) == (head, num - 1):
                runs[-1].append(b)
            else:
                runs.append([b])
        def run(r: list[str]) -> str:
            head, last = _split_number(r[-1])
            return r[0] if len(r) == 1 else f"{r[0]}-{last}" if head.endswith(".") else f"{r[0]}-{r[-1]}"

        return ", ".join(run(r) for r in runs)

    def parse(self, spec, shard: str = "") -> tuple[float, ...]:
        """Block multipliers from a spec: a sequence of all values in block order, or a string that
        is either such a list ("1,1,0.5,...", SuperMerger's format) or NAME:VALUE pairs, NAME a group
        or a block ID, later pairs overriding earlier ones ("IN:0,IN04:1"); blocks not named keep 1.
        ValueError naming the position or name that is wrong and what this denoiser has."""
        who = f"blocks of {shard}" if shard else "blocks"
        if isinstance(spec, str):
            items = [s.strip() for s in spec.split(",") if s.strip()]
            if not items:
                raise ValueError(f"{who}: empty; give {len(self)} values ({self.outline}) or NAME:VALUE pairs")
            if any(":" in s or "=" in s for s in items):
                return self.apply([1.0] * len(self), items, who)
            spec = items
        values = list(spec)
        if len(values) != len(self):
            raise ValueError(f"{who}: {len(values)} values given; this {NAMES.get(self.family, self.family)} denoiser has {len(self)} blocks ({self.outline})")
        return tuple(_multiplier(v, f"{who}: value {i + 1} ({self.ids[i]})") for i, v in enumerate(values))

    def apply(self, values, items: list[str], who: str = "blocks") -> tuple[float, ...]:
        """`values` with NAME:VALUE pairs applied in order (a grid's block axis changes one block of
        a shard's vector)."""
        values = list(values)
        lookup = {b.lower(): [b] for b in self.ids} | {g.lower(): list(m) for g, m in self.groups.items()}
        positions = self._positions
        for item in items:
            name, sep, value = item.replace("=", ":").partition(":")
            found = lookup.get(name.strip().lower())
            if not sep or found is None:
                groups = ", ".join(self.groups) or "none"
                raise ValueError(f"{who}: {item!r}: not NAME:VALUE with NAME a block ({self.outline}) or a group ({groups})")
            v = _multiplier(value.strip(), f"{who}: {name.strip()}")
            for b in found:
                values[positions[b]] = v
        return tuple(values)

    def from_alpha(self, spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """`alpha_multipliers` of a list of exactly one alpha per block of this denoiser."""
        items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
        if len(items) != len(self):
            raise ValueError(f"SuperMerger alpha: {len(items)} values given; this {NAMES.get(self.family, self.family)} denoiser has {len(self)} blocks ({self.outline})")
        return alpha_multipliers(items)

    def format(self, values) -> str:
        """Values as SuperMerger's bare list ("1,1,0.5,...")."""
        return ",".join(f"{float(v):g}" for v in values)

    def presets(self) -> dict[str, tuple[float, ...]]:
        """Named block vectors (docs/block-weights.md): all; input, middle or output only (UNets);
        double or single only (FLUX); linear ramps in and out along the block order; composition
        from this shard (the first half of the denoiser: for UNets BASE, IN and M) and style from
        this shard (the rest: the output blocks and the final layer)."""
        n = len(self)
        out = {"all": (1.0,) * n}
        for group, label in (("IN", "input only"), ("M", "middle only"), ("OUT", "output only"), ("double", "double blocks only"),
                             ("single", "single blocks only")):
            if group in self.groups:
                out[label] = tuple(1.0 if b in self.groups[group] else 0.0 for b in self.ids)
        out["ramp in"] = tuple(round(i / (n - 1), 4) for i in range(n)) if n > 1 else (1.0,)
        out["ramp out"] = tuple(reversed(out["ramp in"]))
        first = set(self.composition)
        out["composition"] = tuple(1.0 if b in first else 0.0 for b in self.ids)
        out["style"] = tuple(0.0 if b in first else 1.0 for b in self.ids)
        return out

    @property
    def composition(self) -> tuple[str, ...]:
        """The blocks that set composition: a UNet's BASE, input and middle blocks; a transformer's
        embedders and the first half of its blocks."""
        if "IN" in self.groups:
            return tuple(b for b in self.ids if b == self.text or b in self.groups["IN"] or b in self.groups["M"])
        numbered = [b for b in self.ids if _split_number(b)[1] is not None]
        first = set(numbered[: len(numbered) // 2])
        return tuple(b for b in self.ids if b in first or (b not in numbered and b != "final_layer"))


def _split_number(block: str) -> tuple[str, int | None]:
    m = re.match(r"^(.*?)(\d+)$", block)
    return (m.group(1), int(m.group(2))) if m else (block, None)


def alpha_multipliers(spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """SuperMerger's block-weighted "Weight sum" alpha list for models A and B, in its own meaning:
    block b is (1 - alpha_b) A + alpha_b B. As the multipliers of two equally weighted shards: A's
    1 - alpha, B's alpha (each block's shares are then exactly SuperMerger's). ValueError for a
    value that is not a number between 0 and 1, or NAME:VALUE pairs."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items or any(":" in str(s) or "=" in str(s) for s in items):
        raise ValueError("SuperMerger alpha: one value per block in block order (e.g. 26 for SD 1.x), not NAME:VALUE pairs")
    alphas = tuple(_multiplier(v, f"SuperMerger alpha: value {i + 1}") for i, v in enumerate(items))
    outside = next((i for i, a in enumerate(alphas) if a > 1), None)
    if outside is not None:
        raise ValueError(f"SuperMerger alpha: value {outside + 1} is {alphas[outside]:g}; alpha is B's share of a block, between 0 and 1")
    return tuple(1.0 - a for a in alphas), alphas


def _multiplier(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{where}: must be a finite number >= 0, got {value!r}")
    return v


def block_map(family: str, config: Mapping, names) -> Blocks:
    """The blocks of a denoiser of `family` ("sd1", "sd2", "sdxl", "sd3", "flux") with `config`
    (its diffusers config) and tensors `names` (diffusers names); ValueError naming a tensor no
    block holds."""
    names = list(names)
    if family in LDM_FAMILIES:
        ldm = ldm_unet_names(names, config)
        stride = config["layers_per_block"] + 1 if isinstance(config["layers_per_block"], int) else None
        count = len(config["block_out_channels"]) * stride if stride else 1 + max(
            int(m.group(2)) for n in ldm.values() if (m := LDM_BLOCK.match(n)) and m.group(1) == "input_blocks")
        ins, outs = [f"IN{i:02d}" for i in range(count)], [f"OUT{i:02d}" for i in range(count)]
        ids = ("BASE", *ins, "M00", *outs)

        def of(name: str) -> str:
            old = ldm[name]
            if old.startswith(("time_embed.", "label_emb.")):
                return "BASE"
            if old.startswith("out."):
                return outs[-1]
            m = LDM_BLOCK.match(old)
            if m is None:
                raise ValueError(f"UNet tensor {name!r} ({old}) is in no block")
            kind, i = m.group(1), int(m.group(2))
            return "M00" if kind == "middle_block" else (ins if kind == "input_blocks" else outs)[i]

        levels = [ins[i : i + stride] for i in range(0, count, stride)] if stride else [ins]  # one group per resolution
        levels += [["M00"]] + ([outs[i : i + stride] for i in range(0, count, stride)] if stride else [outs])
        sweep = (("BASE", ("BASE",)), *((_span(g), tuple(g)) for g in levels))
        return Blocks(family, ids, {n: of(n) for n in names}, {"IN": tuple(ins), "M": ("M00",), "OUT": tuple(outs)}, "BASE", sweep)
    if family not in NUMBERED:
        raise ValueError(f"no block map for family {family!r}")
    fixed = SD3_BLOCKS if family == "sd3" else FLUX_BLOCKS
    numbered = NUMBERED[family]

    def transformer_block(name: str) -> str:
        for prefix, block in numbered:
            if name.startswith(prefix):
                return block + name[len(prefix):].split(".", 1)[0]
        for prefix, block in fixed:
            if name == prefix or name.startswith(prefix):
                return block
        raise ValueError(f"transformer tensor {name!r} is in no block")

    of = {n: transformer_block(n) for n in names}
    present = set(of.values())
    heads = [b for _, b in fixed if b != "final_layer"]
    counts = {block: 1 + max((int(_split_number(b)[1]) for b in present if b.startswith(block)), default=-1) for _, block in numbered}
    ids = (*dict.fromkeys(b for b in heads if b in present), *(f"{block}{i}" for _, block in numbered for i in range(counts[block])), "final_layer")
    groups = {block.rstrip("._").removesuffix("_blocks"): tuple(f"{block}{i}" for i in range(counts[block])) for _, block in numbered}
    sweep = [("embedders", tuple(b for b in ids if b in heads))]
    for members in groups.values():  # each kind of numbered block in quarters
        size = max(1, -(-len(members) // 4))
        sweep += [(_span(members[i : i + size]), members[i : i + size]) for i in range(0, len(members), size)]
    sweep.append(("final_layer", ("final_layer",)))
    return Blocks(family, ids, of, groups, None, tuple(sweep))


def _span(blocks) -> str:
    """A run of blocks as a label: "IN03-05", "double_blocks.0-4", "M00"."""
    first, last = blocks[0], blocks[-1]
    if first == last:
        return first
    head, number = _split_number(last)
    return f"{first}-{last[len(head):]}" if head else f"{first}-{last}"
