import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_preset  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> Path:
    """A preset file naming a tiny base pipeline and three tiny shards (alpha, beta, gamma)."""
    return make_preset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def studio(tiny_preset):
    from soup_ui.presets import load_preset
    from soup_ui.studio import Studio

    return Studio(load_preset(tiny_preset))


def second_preset(tiny_preset: Path) -> Path:
    """Another preset over the same base: two of the shards, other render defaults (for switching)."""
    import yaml

    data = yaml.safe_load(tiny_preset.read_text())
    data.update(name="tiny two", shards=data["shards"][1:], render={**data["render"], "prompts": ["a blue car"], "seed": 7})
    path = tiny_preset.with_name("tiny-two.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(presets: list[Path], folder: Path):
    """`python app.py` serving these presets on a free loopback port; yields its URL."""
    import subprocess
    import time
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "app.py", *[a for p in presets for a in ("--preset", str(p))], "--port", str(port),
         "--models-dir", str(folder), "--output-dir", str(folder / "outputs")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("app.py exited: " + (folder / "server.log").read_text()[-2000:])
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app.py did not start in 180 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def server(tiny_preset):
    """`python app.py` serving the tiny preset (and a second one over the same base)."""
    yield from serve([tiny_preset, second_preset(tiny_preset)], tiny_preset.parent)


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (no browser download). In CI a missing Playwright fails."""
    import os

    try:
        from playwright import sync_api
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Playwright is missing in CI: pip install -r requirements.txt")
        pytest.skip("Playwright is not installed")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.fail("/usr/bin/chromium is missing: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(chromium),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield b
        b.close()


def pytest_configure(config):
    # diffusers and numpy 2 warn about their own internals; keep the summary readable.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")
