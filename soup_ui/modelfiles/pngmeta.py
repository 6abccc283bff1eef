"""Images that carry their recipe, as A1111 and ComfyUI images do: PNG text chunks.

- `parameters`: A1111's layout (the prompt; `Negative prompt: ...`; then `Steps: 12, Sampler: DPM++ 2M,
  CFG scale: 4, Seed: 5, Size: 64x64, Model hash: ..., Model: ...`), with the mix appended
  (`Soup: 0.50 a + 0.50 b, Merge method: ties, Merge parameters: density=0.2`): what A1111's
  "PNG Info", civitai and image browsers show;
- `soup_ui.recipe`: the whole recipe as JSON (preset, mix, method, parameters, render settings), which
  `load_recipe` (`--recipe image.png` on any CLI command) and the page read back.

The text rides on the image's `info`, which Gradio writes into the PNGs it serves; `save` writes it
to files.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..files import portable_preset

RECIPE_KEY = "soup_ui.recipe"
SAMPLERS = {"dpm++": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a", "ddim": "DDIM", "unipc": "UniPC", "pndm": "PLMS", "default": "Default"}


def parameters(recipe, label: str, model_hash: str | None = None) -> str:
    """A1111's `parameters` text for a render of `recipe` (a presets.Recipe)."""
    r = recipe.render
    fields = [("Steps", r.steps), ("Sampler", SAMPLERS.get(r.scheduler, r.scheduler)), ("CFG scale", f"{r.guidance_scale:g}"),
              ("Seed", r.seed), ("Size", f"{r.width}x{r.height}")]
    soup = len(recipe.mix) > 1 or recipe.method != "average"
    if model_hash:
        fields.append(("Model hash", model_hash))
    fields.append(("Model", "soup" if soup else label))  # a soup's recipe is said once, in Soup
    if soup:
        fields += [("Soup", label), ("Merge method", recipe.method)]
        if recipe.params:
            fields.append(("Merge parameters", " ".join(f"{k}={v}" for k, v in recipe.params.items())))
        for name, values in recipe.blocks.items():  # SuperMerger's line per shard (commas become ";", as in every field)
            fields.append((f"Block weights {name}", values if isinstance(values, str) else ",".join(f"{float(v):g}" for v in values)))
    tail = ", ".join(f"{k}: {str(v).replace(',', ';')}" for k, v in fields)
    negative = f"\nNegative prompt: {r.negative_prompt}" if r.negative_prompt else ""
    return f"{r.prompt}{negative}\n{tail}"


def attach(image: Image.Image, recipe, label: str, model_hash: str | None = None) -> Image.Image:
    """A copy of `image` carrying the recipe in its `info` (written as PNG text chunks)."""
    out = image.copy()
    data = recipe.model_dump(mode="json")
    if not data.get("search"):
        data.pop("search", None)
    if recipe.preset is not None:  # portable: a preset of the presets folder by its name there, else absolute
        data["preset"] = portable_preset(recipe.preset)
    out.info = {**image.info, "parameters": parameters(recipe, label, model_hash), RECIPE_KEY: json.dumps(data)}  # in mix order: the sum, and so the pixels, follow it
    return out


def save(image: Image.Image, path):
    """Save as PNG (to a path or a binary file) with the text the image carries (PIL drops `info`
    unless given as pnginfo)."""
    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            info.add_text(key, value)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_recipe(path: str | Path) -> dict | None:
    """The recipe a PNG carries (as data for presets.Recipe), or None."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
    return json.loads(text[RECIPE_KEY]) if RECIPE_KEY in text else None
