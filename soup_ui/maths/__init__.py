"""The soup maths: the weighted-sum kernel (`soup`) and the merge methods with their registry
(`methods`). Pure functions on tensors and state dicts: imports torch (and numpy) only, never files,
models or UI; every other layer may import it.
"""
