import logging
import sys
from contextlib import contextmanager
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
    from soup_ui.modelfiles.presets import load_preset
    from soup_ui.engine.studio import Studio

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


@contextmanager
def app(args: list[str], folder: Path, env: dict | None = None):
    """`python app.py ARGS` on a free loopback port, its output in folder/outputs and its log in
    folder/server.log; yields (URL, process) once it answers, then stops it."""
    import os
    import subprocess
    import time
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "app.py", *args, "--port", str(port), "--output-dir", str(folder / "outputs")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("app.py exited: " + (folder / "server.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app.py did not start in 240 s")
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def serve(presets: list[Path], folder: Path):
    """`python app.py` serving these presets on a free loopback port; yields its URL."""
    with app([*[a for p in presets for a in ("--preset", str(p))], "--models-dir", str(folder)], folder) as (url, _):
        yield url


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


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (repetitions that CI leaves out)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--long"):
        skip = pytest.mark.skip(reason="a long repetition: run with --long")
        for item in items:
            if "long" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a long repetition of a test that CI runs shorter (pytest --long runs it)")
    # diffusers and numpy 2 warn about their own internals; keep the summary readable.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")
