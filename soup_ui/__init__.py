"""Diffusion Soup Studio: mix finetuned diffusion UNets by averaging their weights.

Implements "Diffusion Soup: Model Merging for Text-to-Image Diffusion Models"
(Biggs et al., ECCV 2024, arXiv 2406.08431).
"""

__version__ = "0.1.0"

import os as _os

# No hub access, no telemetry: everything is read from local folders.
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("DO_NOT_TRACK", "1"), ("GRADIO_ANALYTICS_ENABLED", "False")):
    _os.environ.setdefault(_key, _value)
