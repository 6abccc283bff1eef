"""The search space: a point of [0, 1]^d is a mix. The first n - 1 coordinates place the n shards'
weights on the simplex by stick-breaking (shard k takes a share v_k of what the shards before it
left; the last takes the rest), so no coordinate is spent on a scale that normalization throws away
(a pair is one coordinate: its ratio); a weight below `SPARSE` of the largest leaves the shard out,
so sparse mixes are reachable. Then, when asked, each shard's weight per block group (IN / M / OUT
for UNets, the families' own groups for SD3 and FLUX), then the method's numeric parameters over
their ranges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..maths.methods import METHODS
from ..maths.soup import rounded_shares

SPARSE = 0.05  # a weight below this share of the largest leaves the shard out


@dataclass(frozen=True)
class Candidate:
    """A decoded point: weights by shard, block lines by shard (NAME:VALUE pairs), method parameters."""

    weights: dict[str, float]
    blocks: dict[str, str]
    params: dict[str, float]

    def label(self) -> str:
        names = [n for n, w in self.weights.items() if w > 0]
        shares = rounded_shares([self.weights[n] for n in names])
        out = " + ".join(f"{s:.2f} {n}" for n, s in zip(names, shares))
        if self.params:
            out += " (" + ", ".join(f"{k} {v:.2f}" for k, v in self.params.items()) + ")"
        return out + (" [blocks]" if self.blocks else "")


@dataclass(frozen=True)
class Space:
    """What is searched: `shards` (in this order), the block `groups` searched per shard (empty: none),
    and `params`: the method's numeric parameters as (name, low, high)."""

    shards: tuple[str, ...]
    method: str = "average"
    groups: tuple[str, ...] = ()
    params: tuple[tuple[str, float, float], ...] = ()

    @classmethod
    def of(cls, shards: Sequence[str], method: str = "average", groups: Sequence[str] = (), params: Sequence[str] = ()) -> Space:
        """A space over these shards; `params` names numeric parameters of the method, searched over
        their declared ranges. ValueError naming what is wrong."""
        shards = tuple(dict.fromkeys(shards))
        if len(shards) < 2:
            raise ValueError(f"a search needs at least two shards, got {len(shards)}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
        fields = cls.numeric_params(method)
        ranges = []
        for name in params:
            f = fields.get(name)
            if f is None:
                numeric = ", ".join(fields) or "none"
                raise ValueError(f"{method} has no numeric parameter {name!r} to search (it has: {numeric})")
            bounds = {k: getattr(x, k) for x in f.metadata for k in ("ge", "le", "gt", "lt") if getattr(x, k, None) is not None}
            low, high = bounds.get("ge", bounds.get("gt", 0.0)), bounds.get("le", bounds.get("lt", 1.0))
            ranges.append((name, float(max(low, 0.01) if "gt" in bounds else low), float(high)))
        return cls(shards, method, tuple(groups), tuple(ranges))

    @staticmethod
    def numeric_params(method: str) -> dict:
        """The method's numeric (float) parameters by name: what a search can range over."""
        return {f.alias or n: f for n, f in METHODS[method].params.model_fields.items() if f.annotation is float}

    @property
    def dims(self) -> int:
        return len(self.shards) - 1 + len(self.shards) * len(self.groups) + len(self.params)

    def describe(self) -> str:
        """What is searched, in words (the page and the recipe name it)."""
        parts = [f"the weights of {', '.join(self.shards)}"]
        if self.groups:
            parts.append(f"each one's {'/'.join(self.groups)} block weights")
        parts += [f"{self.method} {n} {lo:g}-{hi:g}" for n, lo, hi in self.params]
        return "; ".join(parts)

    def decode(self, x: Sequence[float]) -> Candidate:
        x = [min(1.0, max(0.0, float(v))) for v in x]
        if len(x) != self.dims:
            raise ValueError(f"a point of this space has {self.dims} coordinates, got {len(x)}")
        n = len(self.shards)
        raw, left = [], 1.0
        for v in x[: n - 1]:  # stick-breaking
            raw.append(left * v)
            left *= 1.0 - v
        raw.append(left)
        top = max(raw)
        raw = [w if w >= SPARSE * top else 0.0 for w in raw]
        total = sum(raw)
        weights = {s: round(w / total, 6) for s, w in zip(self.shards, raw)}
        blocks, g = {}, len(self.groups)
        for i, shard in enumerate(self.shards):
            values = x[n - 1 + i * g : n - 1 + (i + 1) * g]
            if g and weights[shard] > 0 and any(v != 1.0 for v in values):
                blocks[shard] = ",".join(f"{name}:{v:.4f}" for name, v in zip(self.groups, values))
        tail = x[n - 1 + n * g :]
        params = {name: round(lo + v * (hi - lo), 6) for (name, lo, hi), v in zip(self.params, tail)}
        return Candidate(weights, blocks, params)

    def start(self) -> list[float]:
        """The plain soup: equal weights (shard k takes 1 / (n - k) of what is left), every block at 1,
        parameters mid-range."""
        n = len(self.shards)
        return [1.0 / (n - k) for k in range(n - 1)] + [1.0] * (n * len(self.groups)) + [0.5] * len(self.params)
