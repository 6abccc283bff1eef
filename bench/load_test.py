"""Load test: simulated users through gradio_client against a real `python app.py`.

    python bench/load_test.py                      # 16 users, 5 minutes, the embedded default
    python bench/load_test.py --users 4 --seconds 30
    python bench/load_test.py --workers 2           # the page with 2 Ray Serve render replicas

Each user has its own client (own session, own download folder) and does what people do on the page:
Generate (`/render`: components and soup), then a few slider moves (`/soup`: the soup alone), with
random mixes, prompts and seeds. Users 1-3 also add a shard to their own session, render with it and
remove it again (`/add_shard`, `/session_render`, `/remove_shard`); user 0 runs grids (`/grid`),
the long workflow that must not hold the others up.

Afterwards every distinct request is rendered again by a fresh server with a single client, one at a
time, and every image the users downloaded is compared with it byte for byte. Prints requests served,
p50/p95 latency per endpoint, mismatches, truncated downloads and the server's RSS at start and end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["grinning face", "red heart", "winking face", "yellow heart", "smiling face with heart-eyes", "face with tears of joy",
           "sun", "red apple", "cat face", "rocket"]
STYLES = ["fluent-color", "fluent-flat", "fluent-hc", "twemoji", "noto", "openmoji"]
logger = logging.getLogger("load_test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py` on a free loopback port, in its own output folder."""

    def __init__(self, workdir: Path, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(self.port), "--output-dir", str(workdir / f"out-{self.port}"), *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("app.py exited; see " + self.log.name)
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("app.py did not start in 300 s")

    def rss_mb(self) -> float:
        """The server's resident memory with its children (render replicas, Ray's own processes)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.Error:
            return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def settings(rng: random.Random) -> tuple:
    # prompt, negative, seed, steps, guidance, scheduler, height, width (the preset's defaults, random prompt and seed)
    return (rng.choice(PROMPTS), "", rng.randint(0, 5), 20, 5.0, "dpm++", 64, 64)


def random_mix(rng: random.Random, names=STYLES) -> str:
    chosen = rng.sample(names, rng.randint(2, 3))
    return ",".join(f"{n}={rng.randint(1, 20) * 0.05:.2f}" for n in chosen)


def image_bytes(item) -> bytes:
    path = item["image"] if isinstance(item, dict) and "image" in item else item
    path = path["path"] if isinstance(path, dict) else path
    return Path(path).read_bytes()


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.images: list[tuple[tuple, int, bytes]] = []  # (request, index in the answer, PNG bytes)
        self.errors: list[str] = []

    def add(self, endpoint: str, seconds: float, request: tuple, images: list[bytes]):
        with self.lock:
            self.latency[endpoint].append(seconds)
            self.images += [(request, i, data) for i, data in enumerate(images)]


def user(index: int, url: str, until: float, folder: Path, results: Results, seed: int):
    from gradio_client import Client

    rng = random.Random(seed * 1000 + index)
    client = Client(url, verbose=False, download_files=str(folder / f"user{index}"))

    def call(endpoint: str, *args):
        t0 = time.perf_counter()
        out = client.predict(*args, api_name=endpoint)
        return out, time.perf_counter() - t0

    while time.time() < until:
        try:
            if index == 0:  # the grid user
                s = settings(rng)
                mix = random_mix(rng)
                x = "seed=" + ",".join(str(rng.randint(0, 50)) for _ in range(3))
                image, dt = call("/grid", "", mix, x, "guidance=3,6", *s)
                results.add("/grid", dt, ("/grid", mix, x, s), [image_bytes(image)])
                continue
            s = settings(rng)
            mix = random_mix(rng)
            (gallery, _), dt = call("/render", "", mix, *s)
            results.add("/render", dt, ("/render", mix, s), [image_bytes(item) for item in gallery])
            for _ in range(rng.randint(2, 5)):  # slider releases
                mix = random_mix(rng)
                (image, _), dt = call("/soup", "", mix, *s)
                results.add("/soup", dt, ("/soup", mix, s), [image_bytes(image)])
            if index in (1, 2, 3) and rng.random() < 0.5:  # this user's own shard
                name, file = f"mine{index}", rng.choice(STYLES) + ".safetensors"
                _, dt = call("/add_shard", "", name, file)
                results.add("/add_shard", dt, (), [])
                mix = f"{name}=1,{rng.choice(STYLES)}=0.5"
                (gallery, _), dt = call("/session_render", "", mix, *s)
                results.add("/session_render", dt, ("/session_render", mix, s, name, file), [image_bytes(item) for item in gallery])
                _, dt = call("/remove_shard", "", name)
                results.add("/remove_shard", dt, (), [])
        except Exception as err:  # noqa: BLE001 - counted and reported
            with results.lock:
                results.errors.append(f"user {index}: {type(err).__name__}: {err}")
            time.sleep(0.5)


def replay(url: str, requests: list[tuple], folder: Path) -> dict[tuple, list[bytes]]:
    """Every distinct request again, one at a time, by a single client of a fresh server."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(folder / "reference"))
    out = {}
    for request in requests:
        endpoint = request[0]
        if endpoint == "/grid":
            _, mix, x, s = request
            image = client.predict("", mix, x, "guidance=3,6", *s, api_name="/grid")
            out[request] = [image_bytes(image)]
        elif endpoint == "/render":
            _, mix, s = request
            gallery, _ = client.predict("", mix, *s, api_name="/render")
            out[request] = [image_bytes(item) for item in gallery]
        elif endpoint == "/soup":
            _, mix, s = request
            image, _ = client.predict("", mix, *s, api_name="/soup")
            out[request] = [image_bytes(image)]
        elif endpoint == "/session_render":  # the user's own shard, in the reference client's session
            _, mix, s, name, file = request
            client.predict("", name, file, api_name="/add_shard")
            gallery, _ = client.predict("", mix, *s, api_name="/session_render")
            client.predict("", name, api_name="/remove_shard")
            out[request] = [image_bytes(item) for item in gallery]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="serve with N Ray Serve render replicas (app.py --workers N); the replay server then "
                        "renders in one process with the replicas' one CPU thread each (CPU images differ in the last bits between thread counts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="soup-load-"))
    server = Server(work, ["--workers", str(args.workers)] if args.workers else [])
    results = Results()
    try:
        from gradio_client import Client

        warm = Client(server.url, verbose=False, download_files=str(work / "warm"))
        warm.predict("", "twemoji=1,openmoji=1", *settings(random.Random(0)), api_name="/render")
        rss_start = server.rss_mb()
        logger.info("server up at %s, RSS %.0f MB; %d users for %.0f s", server.url, rss_start, args.users, args.seconds)
        started = time.time()
        until = started + args.seconds
        threads = [threading.Thread(target=user, args=(i, server.url, until, work, results, args.seed)) for i in range(args.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_end = server.rss_mb()
        minutes = (time.time() - started) / 60
    finally:
        server.stop()

    # Truncated downloads: every PNG must decode whole.
    truncated = 0
    for _, _, data in results.images:
        try:
            Image.open(io.BytesIO(data)).load()
        except Exception:  # noqa: BLE001
            truncated += 1

    # Mismatches against a single-user render of each distinct request by a fresh server.
    distinct = list(dict.fromkeys(r for r, _, _ in results.images if r))
    logger.info("replaying %d distinct requests on a fresh server, one at a time", len(distinct))
    reference_server = Server(work, ["--threads", "1"] if args.workers else [])
    try:
        reference = replay(reference_server.url, distinct, work)
    finally:
        reference_server.stop()
    mismatches = compared = 0
    for request, i, data in results.images:
        expected = reference.get(request)
        if expected is None:
            continue
        compared += 1
        if i >= len(expected) or hashlib.sha256(expected[i]).digest() != hashlib.sha256(data).digest():
            mismatches += 1

    served = sum(len(v) for v in results.latency.values())
    where = f"{args.workers} render replica{'s' if args.workers > 1 else ''} (Ray Serve)" if args.workers else "one process"
    print(f"\n{args.users} users, {args.seconds:.0f} s, the embedded default (6 shards, 64x64, 20 steps) on this machine, {where}")
    print("| endpoint | requests | p50 | p95 |")
    print("|---|---|---|---|")
    for endpoint, times in sorted(results.latency.items()):
        q = statistics.quantiles(times, n=20) if len(times) >= 2 else times * 19
        print(f"| {endpoint} | {len(times)} | {statistics.median(times):.2f} s | {q[18]:.2f} s |")
    print(f"\nrequests served: {served}; errors: {len(results.errors)}; images downloaded: {len(results.images)}; "
          f"compared byte for byte with a single-user render: {compared}; mismatches: {mismatches}; truncated downloads: {truncated}")
    print(f"images per minute: {len(results.images) / minutes:.1f}")
    print(f"server RSS (with its child processes): {rss_start:.0f} MB at start, {rss_end:.0f} MB at the end")
    for e in results.errors[:10]:
        print("error:", e)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not (mismatches or truncated or results.errors) else 1


if __name__ == "__main__":
    sys.exit(main())
