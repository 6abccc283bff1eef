"""Per-tensor geometric methods: SLERP and model stock."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from .kernels import _acc, _write
from .registry import NoParams, merge_method

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


DOT_THRESHOLD = 0.9995  # mergekit's: above it the two tensors count as parallel and are interpolated linearly


@merge_method(
    "slerp", summary="spherical interpolation of two shards per tensor, t = the second shard's weight (linear when near-parallel)",
    reference="Shoemake 1985; mergekit's slerp", needs_base=False, min_shards=2, max_shards=2,
)
def slerp(out, sources, weights, base, p: NoParams, draws=None):
    """sin((1-t) omega)/sin omega v0 + sin(t omega)/sin omega v1, omega the angle between the two
    tensors (flattened); lerp when |cos omega| > 0.9995."""
    v0, v1 = _acc(sources[0]), _acc(sources[1])
    t = weights[1]
    n0, n1 = v0.norm(), v1.norm()
    dot = float((v0 / n0.clamp(min=1e-12) * (v1 / n1.clamp(min=1e-12))).sum()) if n0 > 0 and n1 > 0 else 1.0
    if abs(dot) > DOT_THRESHOLD:
        _write(out, (1 - t) * v0 + t * v1)
        return
    omega = math.acos(dot)
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    _write(out, s0 * v0 + s1 * v1)


@merge_method(
    "model-stock", summary="t w_avg + (1 - t) base, t = K cos / (1 + (K - 1) cos), cos the mean pairwise cosine of the t_i",
    reference="Jang et al. 2024, Model Stock (arXiv 2403.19522)", min_shards=2,
)
def model_stock(out, sources, weights, base, p: NoParams, draws=None):
    """Per tensor, how far to go from the base towards the (weighted) average follows from the angle
    between the task vectors; a negative mean cosine counts as 0 (t = 0: the base)."""
    b = _acc(base)
    deltas = [(_acc(s) - b).reshape(-1) for s in sources]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            ni, nj = deltas[i].norm(), deltas[j].norm()
            cosines.append(float((deltas[i] @ deltas[j]) / (ni * nj)) if ni > 0 and nj > 0 else 0.0)
    cos = max(0.0, sum(cosines) / len(cosines))
    k = len(deltas)
    t = k * cos / (1 + (k - 1) * cos)
    average = sum(w * _acc(s) for w, s in zip(weights, sources))
    _write(out, t * average + (1 - t) * b)
