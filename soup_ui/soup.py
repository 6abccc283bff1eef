"""The soup maths: weighted averages of parameter tensors, in place. Torch only: no files, no UI.

Diffusion Soup (Biggs et al. 2024, Eq. 2): theta_soup = sum_i w_i theta_i / sum_i w_i. With equal
weights this is the uniform soup; the paper shows it approximately samples from the geometric
mean of the shards' distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensors = Mapping[str, torch.Tensor]


def normalize_weights(weights: Sequence[float], names: Sequence[str] | None = None) -> list[float]:
    """Check mixing weights (finite, >= 0, positive sum) and scale them to sum to 1.

    Raises ValueError naming the offending weight; `names` label the weights in messages.
    """
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(weights))]
    if len(weights) == 0:
        raise ValueError("no shard selected: select at least one shard to mix")
    if len(labels) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(labels)} names")
    values = []
    for label, w in zip(labels, weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {label} must be a number, got {w!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"weight of {label} must be finite, got {w}")
        if w < 0:
            raise ValueError(f"weight of {label} must be >= 0, got {w}")
        values.append(w)
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("the weights sum to zero: give at least one selected shard a positive weight")
    return [w / total for w in values]


def check_compatible(target: Tensors, sources: Sequence[Tensors]) -> None:
    """Every source must hold every target tensor, with the same shape. Raises ValueError."""
    for i, source in enumerate(sources):
        for name, tensor in target.items():
            other = source.get(name)
            if other is None:
                raise ValueError(f"source #{i} has no tensor {name!r}")
            if other.shape != tensor.shape:
                raise ValueError(
                    f"source #{i}: tensor {name!r} has shape {tuple(other.shape)}, target has {tuple(tensor.shape)}"
                )


@torch.no_grad()
def average_into(target: Tensors, sources: Sequence[Tensors], weights: Sequence[float]) -> None:
    """Write the weighted average of `sources` into `target`'s tensors, in place (the paper's soup).

    `target` and each source map tensor names to tensors (a state dict, or dict(module.named_parameters())).
    Weights are normalized to sum to 1; a source with weight 0 is not read. Everything is checked
    before the first write, so a bad call changes nothing. Low-precision targets are accumulated in
    float32, so weights (1, 0, ...) reproduce the first source bit for bit.
    """
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    mix = [(s, w) for s, w in zip(sources, normalize_weights(weights)) if w > 0]
    check_compatible(target, [s for s, _ in mix])
    scratch: torch.Tensor | None = None
    for name, out in target.items():
        if out.dtype == torch.float32 or out.dtype == torch.float64:
            acc = out
        else:  # fp16/bf16: sum in float32 in one reused buffer, round once at the end
            if scratch is None or scratch.numel() < out.numel() or scratch.device != out.device:
                scratch = torch.empty(max(out.numel(), 1 << 20), dtype=torch.float32, device=out.device)
            acc = scratch[: out.numel()].view(out.shape)
        (first, w0), rest = mix[0], mix[1:]
        torch.mul(first[name].to(acc.dtype), w0, out=acc)
        for source, w in rest:
            acc.add_(source[name], alpha=w)
        if acc is not out:
            out.copy_(acc)


def mixture_label(names: Sequence[str], weights: Sequence[float]) -> str:
    """The recipe as a label, e.g. "soup: 0.50 twemoji + 0.50 openmoji" (normalized weights)."""
    normalized = normalize_weights(weights, names)
    parts = [f"{w:.2f} {n}" for n, w in zip(names, normalized) if w > 0]
    return "soup: " + " + ".join(parts)
