"""Merge methods: one registry of pure torch functions, each with its typed parameters (mergekit's
`@merge_method` shape). Torch and pydantic only: no files, no UI.

A method is registered once with `@merge_method`; the page's method choice and parameter controls,
the CLI's `--method/--param`, the API fields, recipe validation, cache keys and export metadata are
all read from `METHODS`. Linear methods (a fixed coefficient per shard and for the base) also give
their `coefficients`, so the engine merges them in one fused pass over flat buffers; the others run
tensor by tensor through their function, which writes the merged tensor into `out` in place:

    fn(out, sources, weights, base, params, draws) -> None

`sources` are the shards' tensors, `weights` their normalized weights (sum 1), `base` the base
model's tensor (None unless the method needs it), `draws` where the tensor's random draws come from
(`Draws`: the recipe's seed, the tensor's name and the recipe's `rng`; random methods only), so the
same recipe gives the same weights on any tier and device.
Everything is computed in float32 (float64 for float64 targets) and rounded once.
"""

# isort: off
from . import linear, sparse, geometric  # noqa: F401 (registers the methods, in the page's order)
# isort: on
from .merge import Part, merge_into, restrict
from .registry import METHODS, MergeMethod, Params, merge_method, method
from .selection import magnitude_mask

__all__ = ["METHODS", "MergeMethod", "Params", "Part", "magnitude_mask", "merge_into", "merge_method", "method", "restrict"]
