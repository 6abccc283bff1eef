"""The studio's one error type for requests it cannot carry out."""


class StudioError(ValueError):
    """A request the studio cannot carry out; the message says why, and nothing was changed."""
