"""The mix as one value: built once where a request enters (page, CLI, API, recipe), trusted after.

A `Mix` holds the resolved shards of one view (a session's or the preset's), their weights
normalized once, the merge method with its typed parameters and the text-encoder flag; it knows its
own cache key, label and shares. Studio, workflows, renders and exports take it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import methods
from .errors import StudioError
from .methods import MergeMethod, Params
from .soup import normalize_weights, rounded_shares

if TYPE_CHECKING:
    from .pool import Shard


@dataclass(frozen=True, eq=False)
class Mix:
    """Shards (in mix order), normalized weights, method and parameters, and whether the shards'
    text encoders are mixed too. Equal mixes have equal keys."""

    shards: tuple[Shard, ...]
    weights: tuple[float, ...]
    method: MergeMethod
    params: Params
    text_encoders: bool = False
    given: tuple[float, ...] = ()  # the weights as entered (slider values), for grids that vary one of them
    view: Mapping[str, Shard] = field(default_factory=dict, repr=False)  # the shards it was built from (for reweighted mixes)

    @classmethod
    def build(
        cls, view: Mapping[str, Shard], weights: Mapping[str, float], method: str = "average",
        params: Mapping | Params | None = None, text_encoders: bool = False,
    ) -> Mix:
        """Resolve `weights` ({shard name: weight}) in `view`, normalize them, and validate the method
        and its parameters; StudioError naming what is wrong."""
        try:
            m = methods.method(method)
            typed = m.parse(params)
        except ValueError as err:
            raise StudioError(str(err)) from None
        shards = []
        for name in weights:
            shard = view.get(name)
            if shard is None:
                raise StudioError(f"unknown shard {name!r} (loaded: {', '.join(view) or 'none'})")
            shards.append(shard)
        try:
            normalized = normalize_weights(list(weights.values()), list(weights))
            m.check_shards(len(weights))
            # the order the method takes its shards in (add-difference: A, B, then C)
            order = m.arrange(list(weights), typed) if m.arrange is not None else range(len(weights))
        except ValueError as err:
            raise StudioError(str(err)) from None
        given = [float(w) for w in weights.values()]
        shards, normalized, given = ([xs[i] for i in order] for xs in (shards, normalized, given))
        return cls(tuple(shards), tuple(normalized), m, typed, bool(text_encoders), tuple(given), view)

    @classmethod
    def alone(cls, shard: Shard, text_encoders: bool = False) -> Mix:
        """One shard at weight 1 (a component): nothing to normalize or validate."""
        average = methods.METHODS["average"]
        return cls((shard,), (1.0,), average, average.parse(), text_encoders, (1.0,), {shard.name: shard})

    # -- what it is ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.shards]

    @property
    def pairs(self) -> list[tuple[Shard, float]]:
        return list(zip(self.shards, self.weights))

    @property
    def shares(self) -> list[float]:
        """The weights rounded to two decimals, still summing to 1 (what labels show)."""
        return rounded_shares(self.weights)

    def _params_key(self) -> tuple:
        sha = {s.name: s.sha256 for s in self.shards}  # a parameter naming a shard is keyed by its content
        return tuple((k, sha.get(v, v) if isinstance(v, str) else v) for k, v in sorted(self.params.values().items()))

    @property
    def key(self) -> tuple:
        """What identifies the merged weights: method, parameters, shard contents and weights."""
        return (self.method.name, self._params_key(), tuple((s.sha256, round(w, 12)) for s, w in self.pairs))

    @property
    def text_key(self) -> tuple | None:
        """What identifies the text encoder it renders with: None for the base's (text encoders not
        mixed, or no shard has its own), else the method, parameters and each shard's text-encoder
        hash ("base" for a shard without one) with its weight."""
        if not self.text_encoders or all(s.weights.text_found is None for s in self.shards):
            return None
        return ("text", self.method.name, self._params_key(), tuple((s.text_sha or "base", round(w, 12)) for s, w in self.pairs))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mix) and (self.key, self.text_encoders) == (other.key, other.text_encoders)

    def __hash__(self) -> int:
        return hash((self.key, self.text_encoders))

    @property
    def label(self) -> str:
        """The recipe as a label, e.g. "soup: 0.50 twemoji + 0.50 openmoji", or
        "ties (density 0.3, lambda 1): 0.50 twemoji + 0.50 openmoji"."""
        parts = " + ".join(f"{w:.2f} {n}" for n, w in zip(self.names, self.shares) if w > 0)
        p = self.params.values()
        name = self.method.name
        if name == "average":
            return "soup: " + parts
        if name == "task-arithmetic":
            return f"task arithmetic: base + {p['lambda']:g} x ({parts} - base)"
        if name == "add-difference":
            a, b = self.names[:2]
            return f"add difference: {a} + {p['alpha']:g} x ({b} - {p['c']})"
        if name == "slerp":
            return f"slerp: {self.names[0]} -> {self.names[1]} at t = {self.weights[1]:.2f}"
        shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items())
        return f"{name}{f' ({shown})' if shown else ''}: {parts}"

    def recipe(self) -> dict:
        """Where the merge comes from: method, parameters, whether text encoders were mixed, and each
        shard's name, content hash (its text encoder's too, when mixed) and weight."""
        return {
            "method": self.method.name,
            "params": self.params.values(),
            "text_encoders": self.text_encoders,
            "shards": [
                {"name": s.name, "sha256": s.sha256, "weight": w, **({"text_encoder_sha256": s.text_sha} if self.text_encoders and s.text_sha else {})}
                for s, w in self.pairs
            ],
        }

    # -- mixes derived from it (workflows) ----------------------------------------------------------
    def reweighted(self, weights: Mapping[str, float]) -> Mix:
        """The same method, parameters and view with other weights (a shard of the view may join)."""
        return Mix.build(self.view, weights, self.method.name, self.params, self.text_encoders)

    def without(self, name: str) -> Mix:
        return self.reweighted({n: w for n, w in zip(self.names, self.weights) if n != name})

    def as_weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    def as_given(self) -> dict[str, float]:
        """The weights as entered (slider values), by shard name."""
        return dict(zip(self.names, self.given))
