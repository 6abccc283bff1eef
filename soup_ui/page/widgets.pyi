"""A Gradio component of our own (Gradio writes its typing stub, widgets.pyi, beside this file on
import; the stub is committed, so a checkout stays clean)."""

from __future__ import annotations

import gradio as gr

from gradio.events import Dependency

class TypedSlider(gr.Slider):
    """A slider whose typed value reaches the handler as typed, so the studio checks it and says
    what is wrong once, in place; a weight above the slider's end is simply a larger ratio. Gradio's
    own range check raised once per event the slider feeds ("Value 5 is greater than maximum value
    1.0", twice, with an Error pill over the soup). A subclass, not a patched instance: each page
    keeps copies of its components, of their class."""

    is_template = True  # drawn by Gradio's own slider

    def preprocess(self, payload: float | None) -> float | None:
        return None if payload is None else float(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component