"""Mixing: every mix merged in place into the hybrid, the base denoiser's and text encoders' memory.

A `Mixer` knows which mix its denoiser and its text encoders hold (so an unchanged mix is not
merged again), where the base's own weights are (a copy, or its files in lean mode), and the merge
methods' per-shard statistics that no weight change invalidates (TIES' thresholds). It merges with
the registered methods (methods.merge_into) and adds LoRA shards' low-rank deltas; it renders nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from cachetools import LRUCache

from ..maths import methods, soup
from ..maths.methods import kernels, warm
from ..modelfiles import adapters, checkpoints
from .mix import Mix
from .pool import Pool


def kernels_for(method_: methods.MergeMethod, params: methods.Params, k: int, tensors: Mapping[str, torch.Tensor]) -> AbstractContextManager:
    """How a non-linear merge of these tensors runs its kernels: eager for a model under the soup's
    SD-size bound (compiling costs more than it saves there); in a server (soup.BACKGROUND), eager
    until the method's kernels for k shards are compiled in the background (started here if they
    are not), so no merge waits for the compiler; otherwise (a one-off command) compiled on first use."""
    total = sum(t.numel() for t in tensors.values())
    if total < soup.WARM_UP_MIN:
        return kernels.eager()
    if soup.BACKGROUND:
        like = next(iter(tensors.values()))
        if not warm.ready(method_, params, k, like.dtype, like.device):
            warm.warm_up(method_, params, k, like.dtype, like.device)
            return kernels.eager()
    return nullcontext()


class Mixer:
    """The merged denoiser (`tensors`, flat) and text encoders (`text_tensors`) of one studio."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], text_tensors: dict[str, torch.Tensor], pool: Pool, base_found: checkpoints.Found,
                 device: torch.device, dtype: torch.dtype, lock, lean: Callable[[], bool]):
        self.tensors, self.text_tensors, self.pool, self.base_found = tensors, text_tensors, pool, base_found
        self.device, self.dtype, self.lock, self.lean = device, dtype, lock, lean
        self.mixed: tuple | None = None  # the key of the mix the denoiser holds (None: none known)
        self.text_mixed: tuple | None = None  # what the text encoder holds: None for the base's, else a mix key
        self.base_text: dict[str, torch.Tensor] | None = None  # the base's text encoder, copied when first mixed
        self.stats = LRUCache(1 << 18)  # per-shard statistics that no weight changes (TIES' thresholds), by shard hash and tensor
        self._base: Mapping[str, torch.Tensor] | None = None

    def forget(self) -> None:
        self.mixed = None  # pooled weights changed: the hybrid no longer holds a known mix

    @torch.no_grad()
    def _add_lora(self, sources: list[Mapping[str, torch.Tensor]], coefficients: Mapping[str, list[float]], loras: list[tuple[int, dict[str, adapters.Adapter]]]) -> None:
        """Each weight an adapter changes, computed again in float32 and rounded once: sum_i c_i
        source_i + sum_j c_j * delta_j(base) (e.g. scale_j * up_j @ down_j; the rest of the merge is
        untouched). `coefficients`: per tensor, one per source (its block's, with block weights);
        `loras`: (the LoRA shard's source index, its adapters)."""
        for key in {k for _, lora in loras for k in lora}:
            tensor = self.tensors[key]
            total = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
            cs = coefficients[key]
            for source, c in zip(sources, cs):
                if c:
                    total += c * source[key].float()
            for i, lora in loras:
                if key in lora and cs[i]:
                    total += cs[i] * lora[key].delta(self.base_tensors[key]).to(tensor.device)
            tensor.copy_(total)

    @torch.no_grad()
    def use_text_encoder(self, mix: Mix) -> tuple | None:
        """Make the pipeline's text encoder the one this mix renders with (the base's, or the merge of
        the shards' own with the mix's weights and method, a shard without one counting as the base);
        in place, summed in float32 and rounded once. Call under the lock; returns its key."""
        key = mix.text_key
        if key == self.text_mixed:
            return key
        if self.base_text is None:
            self.base_text = {n: t.detach().clone() for n, t in self.text_tensors.items()}
        self.text_mixed = ("changing",)  # if mixing fails half way, the text encoder is no known mix
        if key is None:
            for name, tensor in self.text_tensors.items():
                tensor.copy_(self.base_text[name])
        else:
            sources = [self.pool.text_encoder_of(s.weights) if s.weights.text_found is not None else self.base_text for s in mix.shards]
            base = self.base_text if mix.method.needs_base else None
            weights, params = mix.text_part
            with kernels_for(mix.method, params, len(sources), self.text_tensors):
                methods.merge_into(self.text_tensors, mix.method, params, sources, weights, base)
        self.text_mixed = key
        return key

    def merge(self, mix: Mix) -> str:
        """Merge the mix's shards into the hybrid denoiser in place; returns its label.

        Skipped when the hybrid already holds this mix (same shards, weights, method and parameters)."""
        with self.lock:
            for s in mix.shards:
                self.pool.fresh(s.weights)  # before the key: a rewritten lean file changes its hash
            key = mix.key
            if key != self.mixed:
                parts = mix.parts()  # block weights: one part per block
                needs_base = mix.method.needs_base or any(p.weights is None for p in parts or ())
                base = self.base_tensors if needs_base else None
                self.mixed = None  # if merging fails half way, the hybrid is not this mix
                if mix.method.linear:
                    # A LoRA shard is base + delta: the base stands in for it in the linear merge, and
                    # its low-rank delta, times the coefficient the method gives that shard, is added after.
                    sources = [self.base_tensors if s.weights.lora is not None else s.tensors for s in mix.shards]
                    methods.merge_into(self.tensors, mix.method, mix.params, sources, mix.weights, base, parts=parts)
                    loras = [(i, s.weights.lora) for i, s in enumerate(mix.shards) if s.weights.lora is not None]
                    if loras:
                        self._add_lora([*sources, self.base_tensors], self._coefficients(mix, parts, {k for _, lora in loras for k in lora}), loras)
                else:  # tensor by tensor; a LoRA shard's full weights are made one tensor at a time (LoraTensors)
                    with kernels_for(mix.method, mix.params, len(mix.shards), self.tensors):
                        methods.merge_into(self.tensors, mix.method, mix.params, [s.tensors for s in mix.shards], mix.weights, base, parts=parts,
                                           memo=self.stats, keys=[s.sha256 for s in mix.shards])
                self.mixed = key
        return mix.label

    @staticmethod
    def _coefficients(mix: Mix, parts: list[methods.Part] | None, keys) -> dict[str, list[float]]:
        """A linear mix's coefficients for each of `keys`: one per shard, then the base's."""
        part_of = {n: p for p in parts for n in p.names} if parts else {}
        out = {}
        for key in keys:
            part = part_of.get(key)
            if part is not None and part.weights is None:
                out[key] = [0.0] * len(mix.shards) + [1.0]
                continue
            coefficients, base_coefficient = mix.method.coefficients(list(part.weights if part else mix.weights), part.params if part else mix.params)
            out[key] = [*coefficients, base_coefficient]
        return out

    @property
    def base_tensors(self) -> Mapping[str, torch.Tensor]:
        """The base UNet's weights (the hybrid overwrote them in memory): loaded once into a buffer of
        the hybrid's layout, or in lean mode read from its files on demand."""
        if self._base is None:
            lazy = checkpoints.LazyWeights(self.base_found.path, self.device, self.dtype, self.base_found.names)
            if self.lean() or not isinstance(self.tensors, soup.FlatTensors):
                self._base = lazy
            else:
                base = soup.FlatTensors(torch.empty_like(self.tensors.buffer), self.tensors.layout)
                for name in lazy.read_order():
                    base[name].copy_(lazy[name])
                self._base = base
        return self._base
