"""What a person clicks: Chromium (Playwright) against a real `python app.py`."""

import io

import numpy as np
from PIL import Image

from browsing import shown


def image_pixels(page, img):
    """Decode the picture an <img> shows, as served."""
    data = page.request.get(img.get_attribute("src")).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_select_mix_generate_and_move_a_slider(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1300, "height": 1200})
    page.goto(server)
    page.wait_for_selector("#shard-check-2", state="visible", timeout=60_000)
    assert shown(page, "#mixture").split() == ["alpha", "34%", "beta", "33%", "gamma", "33%"]

    # Select two shards: untick gamma.
    page.locator("#shard-check-2 input[type=checkbox]").uncheck()
    page.wait_for_function("document.querySelector('#mixture').innerText.includes('alpha 50%')")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#components img').length === 2", timeout=60_000)
    page.wait_for_function("document.querySelector('#soup-label').innerText.includes('soup: 0.50 alpha + 0.50 beta')")
    components = page.locator("#components img")
    assert components.count() == 2
    before_parts = [image_pixels(page, components.nth(i)) for i in range(2)]
    before_srcs = [components.nth(i).get_attribute("src") for i in range(2)]
    soup = page.locator("#soup-image img")
    before_soup, before_soup_src = image_pixels(page, soup), soup.get_attribute("src")

    # Drag alpha's weight down to about 0.2 and let go: only the soup is rendered again.
    track = page.locator("#shard-weight-0 input[type=range]")
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    page.mouse.click(box["x"] + 0.2 * box["width"], box["y"] + box["height"] / 2)
    page.wait_for_function("!document.querySelector('#soup-label').innerText.includes('0.50 alpha')", timeout=60_000)
    label = shown(page, "#soup-label")
    assert label.startswith("soup: 0.1") or label.startswith("soup: 0.2"), label
    page.wait_for_function(f"document.querySelector('#soup-image img').getAttribute('src') !== {before_soup_src!r}")
    after_soup = image_pixels(page, page.locator("#soup-image img"))
    assert page.locator("#components img").count() == 2
    assert [page.locator("#components img").nth(i).get_attribute("src") for i in range(2)] == before_srcs
    for i in range(2):
        assert np.array_equal(image_pixels(page, page.locator("#components img").nth(i)), before_parts[i])
    assert np.abs(after_soup.astype(int) - before_soup.astype(int)).max() > 10
    page.screenshot(path=str(tmp_path / "after.png"), full_page=True)
    page.close()


def test_nothing_ticked_is_an_empty_state_and_the_server_keeps_serving(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector("#shard-check-2", state="visible", timeout=60_000)
    for i in range(3):
        page.locator(f"#shard-check-{i} input[type=checkbox]").uncheck()
    page.click("#generate")
    # Nothing ticked is an empty state (it was an error toast): said in place, the last images kept.
    page.wait_for_function("document.querySelector('#stale-note').innerText.includes('Nothing to mix: no shard is ticked')", timeout=30_000)
    page.wait_for_function("document.querySelector('#soup-label').innerText.trim() === 'Soup: nothing to mix'", timeout=30_000)  # once the timer is gone
    assert page.locator(".toast-body").count() == 0 and "Traceback" not in page.content()
    page.locator("#shard-check-1 input[type=checkbox]").check()
    page.click("#generate")
    page.wait_for_function("document.querySelector('#soup-label').innerText.includes('soup: 1.00 beta')", timeout=60_000)
    page.close()


def test_leave_one_out_view(server, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    page.goto(server)
    page.wait_for_selector("#shard-check-2", state="visible", timeout=60_000)
    page.get_by_role("tab", name="Leave one out").click()
    page.click("#loo-run")
    page.wait_for_function("document.querySelectorAll('#loo-gallery img').length === 4", timeout=90_000)
    captions = page.locator("#loo-gallery").inner_text()
    assert "full soup: 0.34 alpha + 0.33 beta + 0.33 gamma" in captions
    for name in ("alpha", "beta", "gamma"):
        assert f"without {name}:" in captions
    page.close()


def test_add_a_shard_while_running(server, browser, tiny_preset):
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    page.goto(server)
    page.wait_for_selector("#shard-check-2", state="visible", timeout=60_000)
    assert not page.locator("#shard-check-3").is_visible()
    page.get_by_role("tab", name="Add / remove shards").click()
    # Outside the model folders: refused, nothing changes.
    page.locator("#add-name textarea, #add-name input").first.fill("outsider")
    page.locator("#add-path textarea, #add-path input").first.fill("/etc/passwd")
    page.click("#add-shard")
    page.get_by_text("is outside the model folders").first.wait_for(timeout=30_000)
    assert not page.locator("#shard-check-3").is_visible()
    # Inside: validated, then a new row with its own checkbox and slider.
    page.locator("#add-name textarea, #add-name input").first.fill("delta")
    page.locator("#add-path textarea, #add-path input").first.fill(str(tiny_preset.parent / "gamma.safetensors"))
    page.click("#add-shard")
    page.wait_for_selector("#shard-check-3", state="visible", timeout=60_000)
    assert "delta" in page.locator("#shard-check-3").inner_text()
    page.wait_for_function("document.querySelector('#mixture').innerText.includes('delta 25%')")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#components img').length === 4", timeout=90_000)
    page.wait_for_function("document.querySelector('#soup-label').innerText.includes('0.25 delta')")
    # Remove it again (unlearning): the row goes away.
    page.locator("#remove-name textarea, #remove-name input").first.fill("delta")
    page.click("#remove-shard")
    page.wait_for_selector("#shard-check-3", state="hidden", timeout=60_000)
    page.close()


def test_block_weights_on_the_page(server, browser, tmp_path):
    """Issue 20: a wrong block line is said in place and nothing re-renders; the "output only" preset
    re-renders the soup, whose label says blocks, and the picture shows where each shard acts; a grid
    runs over a block axis."""
    page = browser.new_page(viewport={"width": 1300, "height": 1500})
    page.goto(server)
    page.wait_for_selector("#shard-check-2", state="visible", timeout=60_000)
    page.click("#generate")
    page.wait_for_selector("#soup-image img", timeout=60_000)
    before = page.locator("#soup-image img").get_attribute("src")
    label = shown(page, "#soup-label")

    page.click("#shard-blocks-box-1 button")  # open beta's blocks editor
    page.click("#blocks-panel button")  # and the picture of the blocks
    page.fill("#shard-blocks-1 textarea", "1,2,3")
    page.press("#shard-blocks-1 textarea", "Enter")
    page.wait_for_function("document.querySelector('#stale-note').innerText.includes('blocks of beta: 3 values given; "
                           "this SD 1.x denoiser has 10 blocks (BASE, IN00-IN03, M00, OUT00-OUT03)')", timeout=60_000)
    assert page.locator("#soup-image img").get_attribute("src") == before and shown(page, "#soup-label") == label
    assert "blocks of beta: 3 values given" in page.locator("#blocks-picture").inner_text()

    page.click("#shard-blocks-preset-1")
    page.get_by_role("option", name="output only").click()
    page.wait_for_function("document.querySelector('#soup-label').innerText.includes('[blocks: beta; BASE-M00 0.50 alpha + 0.50 gamma, OUT00-OUT03 0.34 alpha + 0.33 beta + 0.33 gamma]')", timeout=60_000)
    assert page.input_value("#shard-blocks-1 textarea") == "0,0,0,0,0,0,1,1,1,1"
    # the block editor turned to beta, its sliders at beta's values
    page.wait_for_function("document.querySelector('#block-slider-1 input[type=number]').value === '0'", timeout=30_000)
    assert page.locator("#blocks-shard input").input_value() == "beta"
    assert page.locator("#block-slider-7 input[type=number]").input_value() == "1"
    assert page.locator("#soup-image img").get_attribute("src") != before
    assert page.locator("#stale-note").inner_text().strip() == ""
    picture = page.locator("#blocks-picture")
    # each cell: the multiplier and the share of the block it comes to (three shards at 1: a third where beta acts)
    assert picture.locator("td[title='beta IN01: x0, share 0%']").count() == 1 and picture.locator("td[title='beta OUT02: x1, share 33%']").count() == 1
    assert "each block's share (multiplier x weight, normalized per block): BASE-M00 0.50 alpha + 0.50 gamma" in picture.inner_text()
    page.screenshot(path=str(tmp_path / "blocks.png"), full_page=True)

    page.get_by_role("tab", name="Interpolate / grid").click()
    page.fill("#grid-x textarea", "block:beta:OUT=0,1")
    page.fill("#grid-y textarea", "seed=0")
    page.click("#grid-run")
    page.wait_for_selector("#grid-image img", timeout=90_000)
    grid = image_pixels(page, page.locator("#grid-image img"))
    assert grid.shape[1] > 2 * 16 and page.locator("#grid-message").inner_text().strip() == ""
    page.close()
