"""Model files: reading and validating checkpoints (`checkpoints`), what differs between SD, SDXL, SD3
and FLUX (`families`), LDM naming (`ldm_names`), adapters such as LoRAs (`adapters`), format detection
and conversion (`formats`), typed presets and recipes (`presets`) and recipes in PNGs (`pngmeta`).
Imports the maths and `soup_ui.errors` / `soup_ui.files`; never the engine, the page or serving.
"""
