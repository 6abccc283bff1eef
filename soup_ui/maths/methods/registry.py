"""The registry: each method's typed parameters (pydantic) and `MergeMethod`, registered once by
`merge_method`; the page, the CLI, the API, recipes and cache keys read `METHODS`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


BOUND_ERRORS = {"less_than_equal", "greater_than_equal", "less_than", "greater_than"}  # pydantic's error types of a range


class Params(BaseModel):
    """A method's parameters: validated once where a request enters, frozen afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def values(self) -> dict:
        """By their public names (`lambda`, not `lambda_`), for recipes, labels and cache keys."""
        return self.model_dump(by_alias=True)


class NoParams(Params):
    pass


def LAMBDA():
    return Field(1.0, ge=0.0, le=10.0, alias="lambda", allow_inf_nan=False, description="scales the merged task vector: base + lambda x merged")


def DENSITY(default: float = 0.5):
    return Field(default, ge=0.0, le=1.0, allow_inf_nan=False, description="the fraction of each task vector's entries kept")


def SEED():
    return Field(0, ge=0, le=2**32 - 1, description="seeds the random drop: the same recipe gives the same weights")


def RNG():
    return Field("counter", description="how the drop is drawn: 'counter' (a hash of the seed, the tensor's name and each entry's "
                                        "index, computed in the merge kernel) or 'torch' (torch's CPU generator: recipes saved before 2026-12-03)")


class TaskArithmeticParams(Params):
    lambda_: float = LAMBDA()


class AddDifferenceParams(Params):
    alpha: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False, description="how much of (B - C) is added to A")
    c: str = Field("base", min_length=1, max_length=64, description="what is subtracted: 'base', or the name of a ticked shard")


class TiesParams(Params):
    density: float = DENSITY(0.2)
    lambda_: float = LAMBDA()


class DareParams(Params):
    density: float = DENSITY()
    lambda_: float = LAMBDA()
    seed: int = SEED()
    rng: Literal["counter", "torch"] = RNG()


class DellaParams(Params):
    density: float = DENSITY()
    epsilon: float = Field(0.1, ge=0.0, le=0.5, allow_inf_nan=False,
                           description="keep probabilities run from density - epsilon (smallest entries) to density + epsilon (largest)")
    lambda_: float = LAMBDA()
    seed: int = SEED()
    rng: Literal["counter", "torch"] = RNG()
    ranks: Literal["sampled", "exact"] = Field("sampled", description="'sampled': each row's magnitude ranks read off 64 of its entries "
                                               "(fast; probabilities near the exact ranks'); 'exact': each row sorted (recipes saved before 2026-12-03)")

    @model_validator(mode="after")
    def _probabilities_in_range(self):
        if self.density - self.epsilon <= 0 or self.density + self.epsilon > 1:
            raise ValueError(
                f"density - epsilon must be > 0 and density + epsilon <= 1 (keep probabilities), got density {self.density:g}, epsilon {self.epsilon:g}"
            )
        return self


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its name, formula, reference, parameters and how it runs."""

    name: str
    summary: str  # the formula, one line
    reference: str  # paper or tool it follows
    params: type[Params]
    fn: Callable | None  # the per-tensor function (None for linear methods: their coefficients say it all)
    needs_base: bool
    coefficients: Callable | None = None  # linear methods: (weights, params) -> (per-shard coefficients, base coefficient)
    random: bool = False
    min_shards: int = 1
    max_shards: int | None = None
    arrange: Callable | None = None  # (shard names, params) -> the order the function takes them in; ValueError if they do not fit
    blocked: Callable | None = None  # (weights, block multipliers, params) -> (weights, params) of one block; None: `for_block`'s rule
    batch: Callable | None = None  # (outs, sources per shard, weights, bases, params[, draws]): many small tensors at once, as `fn` one by one
    stats: Callable | None = None  # (bases, one shard's tensors, params) -> a number per tensor that depends on that shard alone (TIES' thresholds)
    stats_key: Callable | None = None  # params -> what the stats depend on (TIES: the density), for caching them across mixes

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    def for_block(self, weights: Sequence[float], multipliers: Sequence[float], params: Params) -> tuple[tuple[float, ...] | None, Params]:
        """The weights and parameters of one block, given each shard's multiplier for it: by default
        w_i m_i normalized across the shards, or None (the block keeps the base's weights) when they
        are all 0. ValueError when the method cannot take these multipliers."""
        if self.blocked is not None:
            return self.blocked(weights, multipliers, params)
        scaled = [w * m for w, m in zip(weights, multipliers)]
        total = math.fsum(scaled)
        return (tuple(x / total for x in scaled) if total > 0 else None), params

    def parse(self, values: Mapping | Params | None = None) -> Params:
        """Typed parameters from a mapping (page, CLI, API, recipe); ValueError naming the method,
        the parameter and the value."""
        if isinstance(values, self.params):
            return values
        given = dict(values or {})
        try:
            return self.params.model_validate(given)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    known = ", ".join(self.param_names()) or "none"
                    problems.append(f"{self.name} has no parameter {key!r} (its parameters: {known})")
                elif key and e["type"] in BOUND_ERRORS and self.bounds(key):
                    lo, hi = self.bounds(key)
                    problems.append(f"{self.name}: {key} must be between {lo:g} and {hi:g}, got {given.get(key)!r}")
                elif key:
                    problems.append(f"{self.name}: {key} = {given.get(key)!r}: {msg}")
                else:
                    problems.append(f"{self.name}: {msg}")
            raise ValueError("; ".join(problems)) from None

    def bounds(self, name: str) -> tuple[float, float] | None:
        """A numeric parameter's range (ge, le) by its public name, or None."""
        for n, f in self.params.model_fields.items():
            if name in (n, f.alias):
                found = {k: getattr(x, k) for x in f.metadata for k in ("ge", "le") if getattr(x, k, None) is not None}
                return (found["ge"], found["le"]) if len(found) == 2 else None
        return None

    def param_names(self) -> list[str]:
        return [f.alias or n for n, f in self.params.model_fields.items()]

    def check_shards(self, count: int) -> None:
        if count < self.min_shards or (self.max_shards is not None and count > self.max_shards):
            wanted = f"exactly {self.min_shards}" if self.min_shards == self.max_shards else (
                f"{self.min_shards} to {self.max_shards}" if self.max_shards else f"at least {self.min_shards}")
            raise ValueError(f"{self.name} merges {wanted} shards; {count} selected")


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, summary: str, reference: str, params: type[Params] = NoParams, needs_base: bool = True,
                 coefficients: Callable | None = None, random: bool = False, min_shards: int = 1, max_shards: int | None = None,
                 arrange: Callable | None = None, blocked: Callable | None = None, batch: Callable | None = None,
                 stats: Callable | None = None, stats_key: Callable | None = None):
    """Register a merge method under `name`, once, with all its variants (the decorated function is its
    per-tensor function; `batch`, if given, merges many small tensors in one pass exactly as the
    function would; `stats` and `stats_key`, per-shard statistics cached across mixes)."""

    def register(fn: Callable | None) -> Callable | None:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name, summary, reference, params, fn, needs_base, coefficients, random, min_shards, max_shards, arrange, blocked, batch,
                                    stats, stats_key)
        return fn

    return register


def method(name: str) -> MergeMethod:
    """The registered method `name`; ValueError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(METHODS)})") from None
