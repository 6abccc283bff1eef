"""The shipped default: presets/emoji-styles.yaml, its pipeline and its style shards."""

from pathlib import Path

import numpy as np
import pytest

from soup_ui.modelfiles import formats
from soup_ui.modelfiles.presets import RenderSettings, load_preset

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "emoji-styles.yaml"
SHIPPED = ["fluent-color", "fluent-flat", "fluent-hc", "twemoji", "noto", "openmoji"]  # the six styles, in preset order


@pytest.fixture(scope="module")
def emoji():
    from soup_ui.engine.studio import Studio

    return Studio(load_preset(PRESET))


def test_the_preset_loads_every_shipped_shard(emoji):
    assert emoji.failed == {}
    assert list(emoji.shards) == SHIPPED
    assert type(emoji.pipe).__name__ == "StableDiffusionPipeline"
    assert emoji.preset.render.prompts


def test_every_shard_matches_the_base_architecture():
    preset = load_preset(PRESET)
    config, base = formats.base_unet(preset.base)
    for shard in preset.shards:
        found = formats.detect(shard.path, config, base.specs)
        formats.check_against_base(found, base.specs, shard.name)  # raises on a mismatch
        assert found.kind == "diffusers UNet" and not found.ignored and found.specs == base.specs  # names, shapes, dtypes


def test_one_step_render_of_each_shard_and_the_soup(emoji):
    settings = RenderSettings(prompt=emoji.preset.render.prompts[0], steps=1, height=64, width=64, seed=0)
    results = emoji.render(emoji.make_mix({name: 1.0 for name in emoji.shards}), settings)
    assert len(results) == len(emoji.shards) + 1
    images = [np.asarray(r.image) for r in results]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert len({im.tobytes() for im in images}) == len(images)  # every shard draws differently


def licenses_in_assets_readme() -> dict[str, str]:
    """Style -> license, from the bullets "- **a, b** (LICENSE...): ..." of assets/emoji/README.md."""
    import re

    text = (ROOT / "assets" / "emoji" / "README.md").read_text()
    out = {}
    for names, license_ in re.findall(r"^- \*\*([^*]+)\*\* \(([^,)]+)", text, re.M):
        for name in names.split(","):
            out[name.strip()] = license_.strip()
    return out


def test_every_shipped_shard_states_one_license_everywhere():
    """Each shard's license is in the attribution file and in its preset description, and they agree."""
    licenses = licenses_in_assets_readme()
    preset = load_preset(PRESET)
    for shard in preset.shards:
        assert shard.name in licenses, f"{shard.name}: no attribution in assets/emoji/README.md"
        assert licenses[shard.name] in shard.description, (shard.name, licenses[shard.name], shard.description)
    assert licenses["openmoji"] == "CC BY-SA 4.0"  # ShareAlike: its weights carry the license on
