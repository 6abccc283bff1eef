"""Diffusion Soup Studio: mix finetuned diffusion UNets by averaging their weights.

Implements "Diffusion Soup: Model Merging for Text-to-Image Diffusion Models"
(Biggs et al., ECCV 2024, arXiv 2406.08431).
"""

__version__ = "0.1.0"
