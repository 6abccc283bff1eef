"""The named API endpoints, through gradio_client, against a real `python app.py`."""

import threading

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

ARGS = dict(prompt="a red apple", negative_prompt="", seed=5, steps=3, guidance_scale=4.0, scheduler="dpm++", height=16, width=16)


def render(client, mix, **over):
    images, info = client.predict("", mix, *{**ARGS, **over}.values(), api_name="/render")
    return [np.asarray(Image.open(item["image"]["path"] if isinstance(item["image"], dict) else item["image"])) for item in images], info


def test_mix_endpoint_normalizes_and_names_the_recipe(server):
    info = Client(server, verbose=False).predict("", "alpha=3,gamma=1", api_name="/mix")
    assert info["label"] == "soup: 0.75 alpha + 0.25 gamma"
    assert [(s["name"], s["weight"]) for s in info["recipe"]["shards"]] == [("alpha", 0.75), ("gamma", 0.25)]
    assert all(len(s["sha256"]) == 64 for s in info["recipe"]["shards"])


def test_render_endpoint_and_its_errors(server):
    client = Client(server, verbose=False)
    images, info = render(client, "alpha=1,beta=1")
    assert info["labels"] == ["alpha", "beta", "soup: 0.50 alpha + 0.50 beta"]
    assert len(images) == 3 and images[0].shape == (16, 16, 3)
    with pytest.raises(Exception, match="steps: Input should be less than or equal to 150"):
        render(client, "alpha=1", steps=100000)
    with pytest.raises(Exception, match="the weights sum to zero"):
        render(client, "alpha=0")
    with pytest.raises(Exception, match=r"weight of alpha must be between 0 and 100, got 1e\+308"):  # was "internal error: OverflowError"
        render(client, "alpha=1e308,beta=1e308")
    assert render(client, "beta=1")[1]["labels"][-1] == "soup: 1.00 beta"  # still serving


def test_api_images_carry_their_recipe(server):
    """The PNGs the server hands out carry the recipe (Gradio writes the image's text into them)."""
    import json

    images, _ = Client(server, verbose=False).predict("", "alpha=1,gamma=1", *ARGS.values(), api_name="/render")
    soup = Image.open(images[-1]["image"]["path"] if isinstance(images[-1]["image"], dict) else images[-1]["image"])
    recipe = json.loads(soup.text["soup_ui.recipe"])
    assert recipe["mix"] == {"alpha": 1.0, "gamma": 1.0} and recipe["render"]["seed"] == 5
    assert soup.text["parameters"].startswith("a red apple\nSteps: 3, Sampler: DPM++ 2M, CFG scale: 4, Seed: 5, Size: 16x16")


def test_concurrent_sessions_get_their_own_soups(server, studio, tmp_path):
    """Eight clients at once, four different mixes never rendered before: each gets its own soup."""
    from soup_ui.modelfiles.presets import RenderSettings
    from soup_ui.modelfiles.presets import parse_mix as parse_api_mix

    mixes = ["alpha=1,beta=0.1", "alpha=0.1,beta=1", "beta=1,gamma=1", "alpha=1,gamma=0.2"]
    got, errors = {}, []

    def work(i, mix):
        try:
            # Each client downloads into its own folder (they would share one by default).
            client = Client(server, verbose=False, download_files=str(tmp_path / f"client{i}"))
            got[i] = render(client, mix, seed=100)[0][-1].astype(int)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, mixes[i % 4])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # References rendered in this process, one at a time (float maths may differ by a rounding step).
    settings = RenderSettings(**{**ARGS, "seed": 100})
    reference = [np.asarray(studio.render_soup(studio.make_mix(parse_api_mix(m)), settings).image).astype(int) for m in mixes]
    for i, image in got.items():
        distances = [np.abs(image - r).max() for r in reference]
        assert distances[i % 4] <= 2, (mixes[i % 4], distances)
        assert min(d for j, d in enumerate(distances) if j != i % 4) > 10, distances


def test_method_fields_of_the_api(server):
    client = Client(server, verbose=False)
    info = client.predict("", "alpha=1,gamma=1", "ties", "density=0.3", api_name="/mix")
    assert info["label"] == "ties (density 0.3, lambda 1): 0.50 alpha + 0.50 gamma"
    assert info["recipe"]["method"] == "ties" and info["recipe"]["params"] == {"density": 0.3, "lambda": 1.0}
    with pytest.raises(Exception, match="ties: density must be between 0 and 1, got '1.5'"):
        client.predict("", "alpha=1,gamma=1", "ties", "density=1.5", api_name="/mix")
    with pytest.raises(Exception, match="parameter 'density': write NAME=VALUE"):
        client.predict("", "alpha=1,gamma=1", "ties", "density", api_name="/mix")
    assert client.predict("", "alpha=1", api_name="/mix")["label"] == "soup: 1.00 alpha"  # still serving


def test_block_weights_through_the_api(server, studio):
    """Issue 20: block weights in the API ("SHARD=SPEC; SHARD=SPEC"): the recipe carries them, the
    soup is the studio's block-weighted soup, and a wrong spec is one clear message."""
    from soup_ui.modelfiles.presets import RenderSettings

    client = Client(server, verbose=False)
    info = client.predict("", "alpha=1,gamma=1", "average", "", "alpha=OUT:0; gamma=IN:0,M:0.5", api_name="/mix")
    assert info["label"] == "soup: 0.50 alpha + 0.50 gamma [blocks: alpha, gamma; by block: alpha 0.00-1.00, gamma 0.00-1.00]"
    assert info["recipe"]["shards"][0]["blocks"] == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0] and len(info["recipe"]["block_ids"]) == 10
    image, soup_info = client.predict("", "alpha=1,gamma=1", *ARGS.values(), "average", "", "alpha=OUT:0; gamma=IN:0,M:0.5", api_name="/soup")
    expected = studio.render_soup(studio.make_mix({"alpha": 1, "gamma": 1}, blocks={"alpha": "OUT:0", "gamma": "IN:0,M:0.5"}),
                                  RenderSettings(**ARGS)).image
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(expected))
    with pytest.raises(Exception, match="blocks of gamma: 2 values given; this SD 1.x denoiser has 10 blocks"):
        client.predict("", "alpha=1,gamma=1", "average", "", "gamma=1,1", api_name="/mix")
    with pytest.raises(Exception, match="blocks: 'gamma': expected SHARD=SPEC"):
        client.predict("", "alpha=1,gamma=1", "average", "", "gamma", api_name="/mix")
    assert client.predict("", "alpha=1", api_name="/mix")["label"] == "soup: 1.00 alpha"  # still serving


def test_search_endpoint_finds_a_mix_and_refuses_a_python_scorer(server, tmp_path):
    """Issue 34: /search over the preset's shards returns the best image (its recipe in the PNG) and
    every candidate; a python scorer, which would import and call server code, is refused in one line."""
    from gradio_client import handle_file
    from PIL import Image

    reference = tmp_path / "ref.png"
    Image.new("RGB", (16, 16), (250, 250, 250)).save(reference)
    client = Client(server, verbose=False)
    image, info = client.predict("", "alpha,beta", "reference", "", [handle_file(str(reference))], 3, "random", False, *ARGS.values(),
                                 "average", "", "", api_name="/search")
    assert info["searched"] == "the weights of alpha, beta" and len(info["candidates"]) == 3
    assert info["candidates"][0]["label"] == "soup: 0.50 alpha + 0.50 beta" and info["recipe"]["search"].startswith("found by a search of")
    assert "soup_ui.recipe" in Image.open(image).text
    with pytest.raises(Exception, match="python scorers run only from the command line"):
        client.predict("", "alpha,beta", "python:os:getcwd", "", [], 3, "random", False, *ARGS.values(), "average", "", "", api_name="/search")
