"""The mix as one value: built once where a request enters (page, CLI, API, recipe), trusted after.

A `Mix` holds the resolved shards of one view (a session's or the preset's), their weights
normalized once, the merge method with its typed parameters and the text-encoder flag; it knows its
own cache key, label and shares. Studio, workflows, renders and exports take it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import StudioError
from ..maths import methods
from ..maths.methods import MergeMethod, Params, Part
from ..maths.soup import normalize_weights, rounded_shares

if TYPE_CHECKING:
    from ..modelfiles.families import Blocks
    from .pool import Shard


UNSAID = {("rng", "counter"), ("ranks", "sampled")}  # defaults of how a random method draws, left out of labels


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
    blocks: tuple[tuple[float, ...] | None, ...] = ()  # per shard, its block multipliers (None: all 1); () when none has any
    block_map: Blocks | None = field(default=None, repr=False)  # the denoiser's blocks (what the multipliers refer to)

    @classmethod
    def build(
        cls, view: Mapping[str, Shard], weights: Mapping[str, float], method: str = "average",
        params: Mapping | Params | None = None, text_encoders: bool = False,
        blocks: Mapping[str, object] | None = None, block_map: Blocks | None = None,
    ) -> Mix:
        """Resolve `weights` ({shard name: weight}) in `view`, normalize them, and validate the method
        and its parameters; `blocks` ({shard name: block multipliers}, each a spec `Blocks.parse`
        reads) over the denoiser's `block_map`. StudioError naming what is wrong."""
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
        vectors = _block_vectors(blocks or {}, list(weights), block_map)
        shards, normalized, given, vectors = ([xs[i] for i in order] for xs in (shards, normalized, given, vectors))
        mix = cls(tuple(shards), tuple(normalized), m, typed, bool(text_encoders), tuple(given), view,
                  tuple(vectors) if any(v is not None for v in vectors) else (), block_map)
        try:
            mix.parts()  # the method takes these multipliers (add-difference: on B only)
        except ValueError as err:
            raise StudioError(str(err)) from None
        return mix

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
    def blocked(self) -> bool:
        """Whether some shard has block multipliers."""
        return bool(self.blocks)

    def multipliers(self, block: int) -> list[float]:
        """Each shard's multiplier for block number `block` (1 where it has none)."""
        return [1.0 if v is None else v[block] for v in (self.blocks or (None,) * len(self.shards))]

    def parts(self) -> list[Part] | None:
        """The merge per block (methods.Part: tensors, weights, parameters), neighbouring blocks that
        merge alike joined into one part; None without block weights. ValueError when the method
        cannot take the multipliers."""
        if not self.blocked:
            return None
        members = self.block_map.members()
        out: list[Part] = []
        for b, block in enumerate(self.block_map.ids):
            weights, params = self.method.for_block(self.weights, self.multipliers(b), self.params)
            if not members[block]:
                continue
            if out and (out[-1].weights, out[-1].params) == (weights, params):
                out[-1] = Part(out[-1].names + tuple(members[block]), weights, params)
            else:
                out.append(Part(tuple(members[block]), weights, params))
        return out

    @property
    def base_blocks(self) -> list[str]:
        """The blocks that keep the base's weights (every shard's multiplier 0 there)."""
        if not self.blocked:
            return []
        return [block for b, block in enumerate(self.block_map.ids) if self.method.for_block(self.weights, self.multipliers(b), self.params)[0] is None]

    @property
    def text_part(self) -> tuple[tuple[float, ...] | None, Params]:
        """The weights and parameters the text encoders are mixed with: the mix's, or with block weights
        the BASE block's (each shard's weight times its BASE multiplier, normalized; None: all 0 there,
        the base's text encoder; add-difference: alpha times B's BASE multiplier)."""
        if not self.blocked or self.block_map.text is None:
            return self.weights, self.params
        return self.method.for_block(self.weights, self.multipliers(self.block_map.ids.index(self.block_map.text)), self.params)

    @property
    def shares(self) -> list[float]:
        """The weights rounded to two decimals, still summing to 1 (what labels show)."""
        return rounded_shares(self.weights)

    def _params_key(self, params: Params | None = None) -> tuple:
        sha = {s.name: s.sha256 for s in self.shards}  # a parameter naming a shard is keyed by its content
        return tuple((k, sha.get(v, v) if isinstance(v, str) else v) for k, v in sorted((self.params if params is None else params).values().items()))

    @property
    def key(self) -> tuple:
        """What identifies the merged weights: method, parameters, shard contents and weights."""
        key = (self.method.name, self._params_key(), tuple((s.sha256, round(w, 12)) for s, w in self.pairs))
        return key + (("blocks", self.blocks),) if self.blocked else key

    @property
    def model_hash(self) -> str:
        """The soup's identity as A1111's 10-hex "Model hash": of its key (method, parameters, shard
        contents and weights, block weights) and its text encoders, so equal soups share it."""
        import hashlib

        return hashlib.sha256(repr((self.key, self.text_key)).encode()).hexdigest()[:10]

    @property
    def text_key(self) -> tuple | None:
        """What identifies the text encoder it renders with: None for the base's (text encoders not
        mixed, or no shard has its own), else the method, parameters and each shard's text-encoder
        hash ("base" for a shard without one) with its weight."""
        weights, params = self.text_part
        if not self.text_encoders or all(s.weights.text_found is None for s in self.shards) or weights is None:
            return None
        return ("text", self.method.name, self._params_key(params), tuple((s.text_sha or "base", round(w, 12)) for s, w in zip(self.shards, weights)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mix) and (self.key, self.text_encoders) == (other.key, other.text_encoders)

    def __hash__(self) -> int:
        return hash((self.key, self.text_encoders))

    @property
    def label(self) -> str:
        """The recipe as a label, e.g. "soup: 0.50 twemoji + 0.50 openmoji", or
        "ties (density 0.3, lambda 1): 0.50 twemoji + 0.50 openmoji"; with block weights it ends
        "[blocks: twemoji]", naming the shards that have them."""
        label = self._label()
        if self.blocked:
            summary = f"; {self.block_summary}" if self.method.blocked is None else ""
            label += " [blocks: " + ", ".join(n for n, v in zip(self.names, self.blocks) if v is not None) + summary + "]"
        return label

    def block_shares(self) -> list[tuple[str, tuple[float, ...] | None]]:
        """Each block with the shards' shares there (rounded, summing to 1; None: the base's weights):
        what the multipliers come to once normalized per block, as a SuperMerger user reads them."""
        out = []
        for b, block in enumerate(self.block_map.ids):
            weights = self.method.for_block(self.weights, self.multipliers(b), self.params)[0]
            out.append((block, None if weights is None else tuple(rounded_shares(weights))))
        return out

    @property
    def block_summary(self) -> str:
        """The shares per block in a few words, e.g. "IN00-IN08 0.50 alpha + 0.50 beta, IN09-OUT11
        1.00 alpha"; past three runs of equal shares, each shard's range ("by block: alpha 0.50-1.00,
        beta 0-0.50")."""
        return share_runs(self.names, self.block_shares())

    def _label(self) -> str:
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
        shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items() if (k, v) not in UNSAID)
        return f"{name}{f' ({shown})' if shown else ''}: {parts}"

    def recipe(self) -> dict:
        """Where the merge comes from: method, parameters, whether text encoders were mixed, and each
        shard's name, content hash (its text encoder's too, when mixed) and weight."""
        return {
            "method": self.method.name,
            "params": self.params.values(),
            "text_encoders": self.text_encoders,
            "shards": [
                {"name": s.name, "sha256": s.sha256, "weight": w, **({"text_encoder_sha256": s.text_sha} if self.text_encoders and s.text_sha else {}),
                 **({"blocks": list(v)} if v is not None else {})}
                for s, w, v in zip(self.shards, self.weights, self.blocks or (None,) * len(self.shards))
            ],
            **({"block_ids": list(self.block_map.ids)} if self.blocked else {}),
        }

    # -- mixes derived from it (workflows) ----------------------------------------------------------
    def reweighted(self, weights: Mapping[str, float], blocks: Mapping[str, object] | None = None) -> Mix:
        """The same method, parameters, view and block weights with other weights (a shard of the
        view may join, without block weights); `blocks` replaces the block weights of the shards it names."""
        kept = {n: v for n, v in self.as_blocks().items() if n in weights}
        return Mix.build(self.view, weights, self.method.name, self.params, self.text_encoders, {**kept, **(blocks or {})}, self.block_map)

    def as_blocks(self) -> dict[str, tuple[float, ...]]:
        """The block multipliers, by shard name (shards that have them)."""
        return {n: v for n, v in zip(self.names, self.blocks) if v is not None}

    def without(self, name: str) -> Mix:
        return self.reweighted({n: w for n, w in zip(self.names, self.weights) if n != name})

    def as_weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    def as_given(self) -> dict[str, float]:
        """The weights as entered (slider values), by shard name."""
        return dict(zip(self.names, self.given))


def share_runs(names: list[str], shares: list[tuple[str, tuple[float, ...] | None]], most: int = 3) -> str:
    """Blocks' shares (`Mix.block_shares`) as runs of equal shares, or each shard's range past `most` runs."""
    runs: list[list] = []
    for block, v in shares:
        if runs and runs[-1][2] == v:
            runs[-1][1] = block
        else:
            runs.append([block, block, v])

    def said(v) -> str:
        return "base" if v is None else " + ".join(f"{w:.2f} {n}" for n, w in zip(names, v) if w > 0)

    if len(runs) <= most:
        return ", ".join(f"{a if a == b else f'{a}-{b}'} {said(v)}" for a, b, v in runs)
    ranges = []
    for i, name in enumerate(names):
        got = [v[i] for _, v in shares if v is not None]
        low, high = (min(got), max(got)) if got else (0.0, 0.0)
        ranges.append(f"{name} {low:.2f}" if low == high else f"{name} {low:.2f}-{high:.2f}")
    base = sum(v is None for _, v in shares)
    return "by block: " + ", ".join(ranges) + (f"; {base} blocks base" if base else "")


def _block_vectors(blocks: Mapping[str, object], names: list[str], block_map: Blocks | None) -> list[tuple[float, ...] | None]:
    """Per shard (in `names` order), its block multipliers parsed, or None (none given, or all 1)."""
    unknown = [n for n in blocks if n not in names]
    if unknown:
        raise StudioError(f"block weights for {unknown[0]!r}, which is not in the mix ({', '.join(names)})")
    if blocks and block_map is None:
        raise StudioError("this denoiser has no block map: block weights are unavailable")
    out = []
    for name in names:
        spec = blocks.get(name)
        try:
            vector = None if spec is None else block_map.parse(spec, name)
        except ValueError as err:
            raise StudioError(str(err)) from None
        out.append(None if vector is None or all(v == 1 for v in vector) else vector)
    return out
