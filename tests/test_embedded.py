"""The shipped default: presets/emoji-styles.yaml, its pipeline and its style shards."""

from pathlib import Path

import numpy as np
import pytest

from soup_ui import checkpoints
from soup_ui.presets import RenderSettings, load_preset

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "emoji-styles.yaml"
SHIPPED = ["twemoji", "openmoji", "fluent-hc", "noto", "fluent-color"]


@pytest.fixture(scope="module")
def emoji():
    from soup_ui.studio import Studio

    return Studio(load_preset(PRESET))


def test_the_preset_loads_every_shipped_shard(emoji):
    assert emoji.failed == {}
    assert set(SHIPPED) <= set(emoji.shards)
    assert type(emoji.pipe).__name__ == "StableDiffusionPipeline"
    assert emoji.preset.render.prompts


def test_every_shard_matches_the_base_architecture():
    preset = load_preset(PRESET)
    base = checkpoints.tensor_specs(preset.base / "unet")
    for shard in preset.shards:
        checkpoints.compare_specs(shard.name, checkpoints.tensor_specs(shard.path), base)  # raises on a mismatch


def test_one_step_render_of_each_shard_and_the_soup(emoji):
    settings = RenderSettings(prompt=emoji.preset.render.prompts[0], steps=1, height=64, width=64, seed=0)
    results = emoji.render({name: 1.0 for name in emoji.shards}, settings)
    assert len(results) == len(emoji.shards) + 1
    images = [np.asarray(r.image) for r in results]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert len({im.tobytes() for im in images}) == len(images)  # every shard draws differently


def test_the_attribution_ships_with_the_weights():
    text = (ROOT / "assets" / "emoji" / "README.md").read_text()
    assert "CC BY-SA 4.0" in text and "openmoji" in text and "Microsoft" in text and "Twitter" in text
