"""The linear methods: a fixed coefficient per shard and one for the base, merged by the engine in
one fused pass over flat buffers (average, task arithmetic, add-difference)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .registry import AddDifferenceParams, TaskArithmeticParams, merge_method

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


# -- the methods --------------------------------------------------------------------------------------
merge_method(
    "average", summary="sum_i w_i theta_i (weights normalized): the paper's soup",
    reference="Diffusion Soup, Biggs et al. 2024 (arXiv 2406.08431), Eq. 2", needs_base=False,
    coefficients=lambda w, p: (list(w), 0.0),
)(None)

merge_method(
    "task-arithmetic", summary="base + lambda sum_i w_i (theta_i - base)",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)", params=TaskArithmeticParams,
    coefficients=lambda w, p: ([p.lambda_ * x for x in w], 1.0 - p.lambda_),
)(None)


def _add_difference_order(names: list[str], p: AddDifferenceParams) -> list[int]:
    """A and B in row order, then C when it is a shard; ValueError when the selection does not fit."""
    if p.c != "base" and p.c not in names:
        raise ValueError(f"add-difference: c = {p.c!r}: not one of the selected shards ({', '.join(names)}) nor 'base'")
    if len(names) != (2 if p.c == "base" else 3):
        raise ValueError(f"add-difference merges A + alpha (B - C): select 2 shards with c = 'base', or 3 with c naming one; {len(names)} selected")
    return [i for i, n in enumerate(names) if n != p.c] + ([names.index(p.c)] if p.c != "base" else [])


def _add_difference_coefficients(weights, p: AddDifferenceParams):
    # Sources come in _add_difference_order: A, B (and C when it is a shard): A + alpha (B - C).
    if p.c == "base":
        return [1.0, p.alpha], -p.alpha
    return [1.0, p.alpha, -p.alpha], 0.0


def _add_difference_block(weights, multipliers, p: AddDifferenceParams):
    """Per block, alpha times B's multiplier (A1111's MBW add difference); A and C are taken whole."""
    fixed = [m for i, m in enumerate(multipliers) if i != 1 and m != 1]
    if fixed:
        raise ValueError("add-difference takes block weights on B only (they scale alpha per block); A and C are taken whole")
    return tuple(weights), p.model_copy(update={"alpha": p.alpha * multipliers[1]})


merge_method(
    "add-difference", summary="A + alpha (B - C), C the base or a chosen shard; the weights are not used",
    reference="AUTOMATIC1111's checkpoint merger ('Add difference')", params=AddDifferenceParams,
    coefficients=_add_difference_coefficients, min_shards=2, max_shards=3, arrange=_add_difference_order, blocked=_add_difference_block,
)(None)
