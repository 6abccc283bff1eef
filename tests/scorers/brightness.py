"""User scorers for the search tests: one number per image, higher is better."""

import numpy as np

calls = 0


def score(images, prompts):
    """Mean brightness of each image, 0-1."""
    return [float(np.asarray(im.convert("L")).mean()) / 255 for im in images]


def flaky(images, prompts):
    """Scores the first five candidates, then its service is down."""
    global calls
    calls += 1
    if calls > 5:
        raise RuntimeError("the scorer's service is down")
    return score(images, prompts)


def broken(images, prompts):
    """Never scores."""
    raise RuntimeError("no GPU here")
