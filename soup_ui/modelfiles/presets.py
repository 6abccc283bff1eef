"""Presets: a base pipeline, its shards and render defaults, as typed objects validated at read time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..files import PRESETS
from ..maths.soup import MAX_WEIGHT, checked_weight

SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "default": None,  # the base pipeline's own scheduler (the only one for SD3 and FLUX: flow matching)
}
SchedulerName = Literal["dpm++", "euler", "euler-a", "ddim", "unipc", "pndm", "default"]
MAX_STEPS = 150
MIN_STEPS = {"pndm": 4}  # PNDM's Runge-Kutta warm-up needs 4 steps (fewer fail inside diffusers)
MAX_SIZE = 2048


class PresetError(ValueError):
    """A preset or recipe file that cannot be used; the message names the file, the key and the value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RenderSettings(Strict):
    """Everything that determines an image besides the UNet weights."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    steps: int = Field(20, ge=1, le=MAX_STEPS)  # num_inference_steps
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    height: int = Field(64, ge=8, le=MAX_SIZE)
    width: int = Field(64, ge=8, le=MAX_SIZE)
    scheduler: SchedulerName = "dpm++"

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be divisible by 8 but is {v}")
        return v

    @model_validator(mode="after")
    def _enough_steps(self):
        least = MIN_STEPS.get(self.scheduler, 1)
        if self.steps < least:
            raise ValueError(f"steps: the {self.scheduler} scheduler needs at least {least} steps, got {self.steps}")
        return self


class RenderDefaults(RenderSettings):
    """A preset's render defaults: the settings plus example prompts for the page."""

    prompts: list[str] = Field(default_factory=list)


class ShardSpec(Strict):
    """One finetuned UNet: a diffusers unet/ folder or one .safetensors file."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    path: Path
    weight: float = Field(1.0, ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False)
    description: str = ""


class Preset(Strict):
    """A base pipeline and the shards finetuned from it."""

    name: str = ""
    description: str = ""
    base: Path  # a diffusers pipeline folder (model_index.json), or a single-file checkpoint with `config`
    config: Path | None = None  # for a single-file base: a diffusers pipeline folder giving configs and tokenizer (default: shipped, by family)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # override the base's scheduler (SD 2.x 512-px files are epsilon)
    shards: list[ShardSpec] = Field(min_length=1)
    render: RenderDefaults = RenderDefaults()
    # Mix the shards' own text encoders with the same weights (full single files and pipeline folders
    # carry one; a shard without counts as the base's). Off by default: the paper soups the denoiser.
    mix_text_encoders: bool = False
    source: Path | None = None  # the file this preset was read from (set by load_preset)

    @model_validator(mode="after")
    def _unique_names(self) -> "Preset":
        seen = set()
        for i, shard in enumerate(self.shards):
            if shard.name in seen:
                raise ValueError(f"shards.{i}.name: duplicate shard name {shard.name!r}")
            seen.add(shard.name)
        return self


def describe_validation_error(source: str | Path, err: ValidationError) -> str:
    """One line per problem: file, dotted key, what is wrong, and the value given."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{source}: {key}: {msg}{shown}")
    return "\n".join(lines)


def resolve(path: Path, relative_to: Path) -> Path:
    return path if path.is_absolute() else (relative_to / path).resolve()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def hub_snapshot(repo_id: str, source: Path) -> Path:
    """A Hugging Face Hub id as base: its snapshot in the local Hub cache, never a download."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached (or an unusable cache entry)
        raise PresetError(
            f"{source}: base: {repo_id!r} is not a folder here nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it once with `hf download {repo_id}` where there is internet, or give a pipeline folder"
        ) from None


def parse_preset(data: dict, source: Path) -> Preset:
    """Validate a preset mapping read from `source`; relative paths are taken from its folder."""
    try:
        preset = Preset.model_validate(data)
    except ValidationError as err:
        raise PresetError(describe_validation_error(source, err)) from None
    folder = source.parent
    base = resolve(preset.base, folder)
    if not base.exists() and HUB_ID.match(str(preset.base)):
        base = hub_snapshot(str(preset.base), source)
    config = resolve(preset.config, folder) if preset.config is not None else None
    if not base.exists():  # the real cause, not "no model_index.json" (a missing file was reported as a folder)
        raise PresetError(f"{source}: base: no such file or folder {str(preset.base)!r}")
    if base.is_file():
        if base.suffix.lower() != ".safetensors":
            raise PresetError(f"{source}: base: a single-file base must be .safetensors (pickle checkpoints are refused), got {str(preset.base)!r}")
        if config is not None and not (config / "model_index.json").is_file():
            raise PresetError(f"{source}: config: not a diffusers pipeline folder (no model_index.json): {str(preset.config)!r}")
        if config is None:  # the shipped configs of its family
            from .checkpoints import CheckpointError
            from .families import single_file_family

            try:
                single_file_family(base)
            except CheckpointError as err:
                raise PresetError(f"{source}: base: {err}") from None
    elif not (base / "model_index.json").is_file():
        raise PresetError(f"{source}: base: no diffusers pipeline (model_index.json) at {str(preset.base)!r}")
    shards = []
    for i, shard in enumerate(preset.shards):
        path = resolve(shard.path, folder)
        if not path.exists():
            raise PresetError(f"{source}: shards.{i}.path: no such file or folder {str(shard.path)!r}")
        shards.append(shard.model_copy(update={"path": path}))
    return preset.model_copy(update={"base": base, "config": config, "shards": shards, "source": source.resolve()})


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise PresetError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_preset(path: str | Path) -> Preset:
    """Read and validate a preset YAML file."""
    return parse_preset(read_yaml(path), Path(path))


def list_presets(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.yaml")) + sorted(Path(folder).glob("*.yml"))


RANDOM_BEFORE_COUNTER = ("dare", "dare-ties", "della")  # the random methods that drew with torch's generator before `rng`


class Recipe(Strict):
    """A saved mix: which preset, the shard weights, the merge method with its parameters and the
    render settings. Recipes of earlier versions are read as they were made: `mode` and `scale` as
    method and lambda; a random method's recipe without `rng` (saved before 2026-12-03) draws with
    torch's generator (and DELLA ranks exactly), as it did then."""

    preset: Path | None = None  # relative paths are taken from the recipe file's folder
    mix: dict[str, float] = Field(min_length=1)
    method: str = "average"  # a registered merge method (methods.METHODS)
    params: dict[str, float | int | str] = Field(default_factory=dict)  # its parameters, by the names the method gives them
    text_encoders: bool = False  # the shards' text encoders mixed too
    blocks: dict[str, list[float] | str] = Field(default_factory=dict)  # block multipliers by shard (a list in block order, or a spec "IN:0,OUT:1")
    render: RenderSettings = RenderSettings()
    search: str = ""  # where a search found it: what was searched and the score (soup_ui.search)

    @model_validator(mode="before")
    @classmethod
    def _earlier_layout(cls, data):
        if isinstance(data, dict) and ("mode" in data or "scale" in data) and "method" not in data:
            data = dict(data)
            data["method"] = data.pop("mode", "average")
            scale = data.pop("scale", None)
            if scale is not None and data["method"] == "task-arithmetic":
                data["params"] = {"lambda": scale, **data.get("params", {})}
        if isinstance(data, dict) and data.get("method") in RANDOM_BEFORE_COUNTER and "rng" not in (data.get("params") or {}):
            before = {"rng": "torch", **({"ranks": "exact"} if data["method"] == "della" else {})}
            data = {**data, "params": {**(data.get("params") or {}), **before}}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from ..maths.methods import method

        method(name)  # ValueError listing the known methods
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict, info: ValidationInfo) -> dict:
        from ..maths.methods import METHODS

        if info.data.get("method") in METHODS:
            METHODS[info.data["method"]].parse(params)  # ValueError naming the method, the parameter and the value
        return params

    @classmethod
    def of(cls, preset: Path | None, mix, render: RenderSettings) -> "Recipe":
        """The recipe of a Mix: its weights as entered, method, parameters and text-encoder flag."""
        return cls(preset=preset, mix=mix.as_given(), method=mix.method.name, params=mix.params.values(),
                   text_encoders=mix.text_encoders, blocks={n: list(v) for n, v in mix.as_blocks().items()}, render=render)

    @field_validator("blocks")
    @classmethod
    def _blocks_of_mixed_shards(cls, blocks: dict, info: ValidationInfo) -> dict:
        mix = info.data.get("mix") or {}
        for name in blocks:
            if name not in mix:
                raise ValueError(f"block weights for {name!r}, which is not in the mix ({', '.join(mix)})")
        return blocks

    @field_validator("mix")
    @classmethod
    def _weights_in_range(cls, mix: dict[str, float]) -> dict[str, float]:
        return {name: checked_weight(name, w) for name, w in mix.items()}  # the rule every mix follows


def parse_blocks(items) -> dict[str, str]:
    """Block weights as given: ["twemoji=IN:0,OUT:1", ...] -> {"twemoji": "IN:0,OUT:1"}, or one text
    with the items separated by ";" or new lines. The specs are read against the denoiser's blocks
    when the mix is built (families.Blocks.parse); ValueError for an item without SHARD=SPEC or a
    shard given twice."""
    if isinstance(items, str):
        items = items.replace("\n", ";").split(";")
    out: dict[str, str] = {}
    for item in (i.strip() for i in items or []):
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ValueError(f"{item!r}: expected SHARD=SPEC, e.g. twemoji=IN:0,OUT:1")
        if name.strip() in out:
            raise ValueError(f"{name.strip()!r} given twice")
        out[name.strip()] = spec.strip()
    return out


def parse_mix(text: str) -> dict[str, float]:
    """"a=0.5,b=0.5" -> {"a": 0.5, "b": 0.5}; a bare name weighs 1; a name given twice is an error."""
    mix: dict[str, float] = {}
    for item in (p.strip() for p in (text or "").split(",")):
        if item:
            name, sep, value = item.partition("=")
            name = name.strip()
            try:
                weight = float(value) if sep else 1.0
            except ValueError:
                raise ValueError(f"mix: weight of {name!r} is not a number: {value!r}") from None
            if name in mix:
                raise ValueError(f"mix: shard {name!r} is given twice")
            mix[name] = weight
    return mix


def parse_params(items) -> dict[str, str]:
    """["density=0.3", "lambda=1"] (or "density=0.3,lambda=1") -> {"density": "0.3", "lambda": "1"};
    the method's parameter model types and checks the values. ValueError naming a malformed item."""
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    params: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"parameter {item.strip()!r}: write NAME=VALUE, e.g. density=0.3")
        if name.strip() in params:
            raise ValueError(f"parameter {name.strip()!r} is given twice")
        params[name.strip()] = value.strip()
    return params


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe: a YAML file, or a PNG the studio wrote (its recipe chunk, see
    `pngmeta`); a relative preset path is resolved from its folder."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            from .pngmeta import read_recipe

            try:
                data = read_recipe(path)
            except (OSError, ValueError) as err:
                raise PresetError(f"{path}: not a readable PNG ({err})") from None
            if data is None:
                raise PresetError(f"{path}: this PNG carries no studio recipe (no soup_ui.recipe text chunk)")
            recipe = Recipe.model_validate(data)
        else:
            recipe = Recipe.model_validate(read_yaml(path))
    except ValidationError as err:
        raise PresetError(describe_validation_error(path, err)) from None
    if recipe.preset is not None:
        recipe = recipe.model_copy(update={"preset": found_preset(recipe.preset, path.parent)})
    return recipe


def found_preset(preset: Path, folder: Path) -> Path:
    """A recipe's preset: relative to the recipe's folder, else in this checkout's presets folder
    (a portable name, or an absolute path from another machine whose file name is here)."""
    near = resolve(preset, folder)
    if near.is_file():
        return near
    for candidate in (PRESETS / preset, PRESETS / Path(preset).name):  # this checkout's presets folder
        if not Path(preset).is_absolute() or candidate.name == Path(preset).name:
            if candidate.is_file():
                return candidate.resolve()
    return near


def write_yaml_atomic(data: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write YAML through a temporary file and a rename; refuses to replace a file unless asked."""
    from ..files import atomic_path

    path = Path(path)
    if path.exists() and not overwrite:
        raise PresetError(f"{path} exists; confirm overwriting it (--overwrite) or choose another name")
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def save_recipe(recipe: Recipe, path: str | Path, overwrite: bool = False) -> Path:
    """Save a recipe; the preset path is written relative to the recipe's folder where possible."""
    import os

    path = Path(path)
    data = recipe.model_dump(mode="json")
    for key in ("blocks", "search"):
        if not data[key]:
            del data[key]
    if recipe.preset is not None:
        try:
            data["preset"] = os.path.relpath(Path(recipe.preset).resolve(), path.parent.resolve())
        except ValueError:  # another drive
            data["preset"] = str(Path(recipe.preset).resolve())
    return write_yaml_atomic(data, path, overwrite)


def preset_data(preset: Preset, folder: Path) -> dict:
    """A preset as YAML-ready data, paths relative to `folder` where possible."""
    import os

    def rel(p: Path) -> str:
        try:
            return os.path.relpath(Path(p).resolve(), folder.resolve())
        except ValueError:
            return str(Path(p).resolve())

    data = preset.model_dump(mode="json", exclude={"source"})
    data["base"] = rel(preset.base)
    if preset.config is not None:
        data["config"] = rel(preset.config)
    else:
        data.pop("config", None)
    for shard, spec in zip(data["shards"], preset.shards):
        shard["path"] = rel(spec.path)
    return data
