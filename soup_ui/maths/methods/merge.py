"""The engine: `merge_into` runs a method over every tensor of a model (linear methods fused, the
others tensor by tensor or in batches of small tensors), by parts when block weights are in use."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch

from .draws import Draws
from .kernels import _acc, runs_fused
from .registry import MergeMethod, Params

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


# -- the engine -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """Tensors merged with one set of weights and parameters (a block of a block-weighted mix);
    weights None: they keep the base's weights."""

    names: tuple[str, ...]
    weights: tuple[float, ...] | None
    params: Params


def restrict(parts: Sequence[Part], names) -> list[Part]:
    """The parts of these tensors only (a streamed export merges a group of tensors at a time)."""
    keep = set(names)
    out = [Part(tuple(n for n in p.names if n in keep), p.weights, p.params) for p in parts]
    return [p for p in out if p.names]


@torch.no_grad()
def merge_into(
    target: Tensors, method_: MergeMethod, params: Params, sources: Sequence[Tensors], weights: Sequence[float],
    base: Tensors | None = None, fused: bool | None = None, progress: Callable[[float], None] | None = None,
    parts: Sequence[Part] | None = None, memo: MutableMapping | None = None, keys: Sequence | None = None,
) -> None:
    """Merge `sources` (normalized `weights`) into `target` in place with a registered method.

    `memo` and `keys` (each source's content key; the base is the memo owner's): per-shard
    statistics that do not depend on the mix (TIES' thresholds) are kept there across mixes, so a
    new weight recomputes none of them.

    `parts` (block weights): tensors merged with their own weights and parameters, together covering
    `target`; by default one part of everything with `weights` and `params`. Linear methods are one
    weighted sum (`soup.weighted_sum_parts`: one pass over flat buffers, one range per part); the
    others run tensor by tensor (lazily read sources, lean or pinned, are resident one tensor each).
    Everything is checked before the first write."""
    from .. import soup

    if parts is None:
        parts = [Part(tuple(target), tuple(weights), params)]
    elif sorted(n for p in parts for n in p.names) != sorted(target):
        raise ValueError("the parts do not cover the target's tensors exactly once")
    if (method_.needs_base or any(p.weights is None for p in parts)) and base is None:
        raise ValueError(f"{method_.name} needs the base weights")
    if method_.linear:
        with_base = []
        for p in parts:
            if p.weights is None:  # the base's weights
                with_base.append((p.names, [0.0] * len(sources), 1.0))
            else:
                coefficients, base_coefficient = method_.coefficients(list(p.weights), p.params)
                with_base.append((p.names, coefficients, base_coefficient))
        extra = [base] if any(b for _, _, b in with_base) else []
        soup.weighted_sum_parts(target, [*sources, *extra], [(n, [*c, *([b] if extra else [])]) for n, c, b in with_base], fused)
        return
    soup.check_compatible(target, [*sources, *([base] if base is not None else [])])
    read_order = getattr(sources[0], "read_order", None)  # lazy sources: walk their files front to back
    names = list(target)
    if callable(read_order):
        rank = {n: i for i, n in enumerate(read_order())}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    part_of = {n: p for p in parts for n in p.names}
    known = _Stats(method_, sources, base, memo, keys) if method_.stats is not None and memo is not None and keys is not None else None
    if method_.batch is not None:  # small tensors of one part in a few eager passes
        names = _merge_batches(target, method_, sources, base, part_of, names, known)
    for i, name in enumerate(names):
        out, part = target[name], part_of[name]
        if not out.is_floating_point():  # integer buffers (counters): the first source's
            out.copy_(sources[0][name])
        elif part.weights is None:
            out.copy_(base[name])
        else:
            draws = _draws_of(part.params, name) if method_.random else None
            extra = {"stats": known.get([name], part.params)[:, 0]} if known is not None else {}
            method_.fn(out, [s[name] for s in sources], list(part.weights), base[name] if base is not None else None, part.params, draws, **extra)
        if progress is not None:
            progress((i + 1) / len(names))


def _draws_of(params: Params, name: str) -> Draws:
    return Draws(getattr(params, "seed", 0), name)


BATCH_ELEMENTS = 1 << 18  # elements per batched pass (bounds its temporaries: a few times this per shard)


class _Stats:
    """A method's per-shard statistics of tensors, from the memo or computed (and kept) there."""

    def __init__(self, method_: MergeMethod, sources, base, memo: MutableMapping, keys: Sequence):
        self.method, self.sources, self.base, self.memo, self.keys = method_, sources, base, memo, keys

    def get(self, names: list[str], params: Params) -> torch.Tensor:
        """(shards, tensors) of these tensors under these parameters."""
        out = []
        for shard, key in zip(self.sources, self.keys):
            memo_key = lambda n: (self.method.name, self.method.stats_key(params), key, n)  # noqa: E731
            missing = [n for n in names if memo_key(n) not in self.memo]
            if missing:
                values = self.method.stats([self.base[n] for n in missing], [shard[n] for n in missing], params)
                for n, v in zip(missing, values.tolist()):
                    self.memo[memo_key(n)] = v
            out.append([self.memo[memo_key(n)] for n in names])
        like = self.base[names[0]]
        return torch.tensor(out, dtype=_acc(like).dtype, device=like.device)


def _merge_batches(target, method_: MergeMethod, sources, base, part_of, names: list[str], known: _Stats | None = None) -> list[str]:
    """Merge the floating tensors too small to run fused (kernels.runs_fused) with the method's batch function, a part
    at a time in passes of about BATCH_ELEMENTS; returns the names left for the per-tensor loop."""
    rest, groups = [], {}
    for name in names:
        out, part = target[name], part_of[name]
        if out.is_floating_point() and not runs_fused(out.numel()) and part.weights is not None:
            groups.setdefault(id(part), (part, []))[1].append(name)
        else:
            rest.append(name)
    for part, members in groups.values():
        batch, size = [], 0
        for j, name in enumerate(members):
            batch.append(name)
            size += target[name].numel()
            if size >= BATCH_ELEMENTS or j + 1 == len(members):
                args = [[target[n] for n in batch], [[s[n] for n in batch] for s in sources], list(part.weights), [base[n] for n in batch], part.params]
                if method_.random:  # each tensor's own draws, as tensor by tensor
                    args.append([_draws_of(part.params, n) for n in batch])
                method_.batch(*args, **({"stats": known.get(batch, part.params)} if known is not None else {}))
                batch, size = [], 0
    return rest
