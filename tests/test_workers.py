"""Render workers on Ray Serve (a local Ray instance on the CPU, 2 replicas, the tiny fixtures): the
page's handlers get the same bytes as the in-process studio, for several mixes, methods, seeds and
visitors at once; an added shard works on whichever replica answers; a replica killed mid-run
costs nothing."""

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: its servers on loopback only, as app.py has them
import ray  # noqa: E402
import torch
from safetensors.torch import load_file, save_file

from soup_ui.page import session as handlers
from soup_ui.serving import workers as W
from soup_ui.modelfiles.presets import RenderSettings
from soup_ui.page.session import Controls, StudioHost
from soup_ui.engine.mix import Mix
from soup_ui.engine.studio import RuntimeOptions, StudioError

SETTINGS = RenderSettings(prompt="a red apple", steps=3, guidance_scale=4.0, height=16, width=16, seed=3)
REPLICAS = 2


@pytest.fixture(scope="module")
def workers(tiny_preset):
    started = W.Workers.start([tiny_preset], RuntimeOptions(), W.WorkerOptions(replicas=REPLICAS, cpus=1))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def routed(workers, tiny_preset, tmp_path_factory):
    """The page's host with renders going to the workers."""
    return StudioHost([tiny_preset], W.Workers.PAGE_OPTIONS, loader=workers.loader, models_dirs=[tiny_preset.parent],
                      output_dir=tmp_path_factory.mktemp("routed"))


@pytest.fixture(scope="module")
def local(tiny_preset, tmp_path_factory):
    """The in-process studio, rendering with the replicas' one thread (CPU images differ in the last
    bits between thread counts, not between processes)."""
    return StudioHost([tiny_preset], models_dirs=[tiny_preset.parent], output_dir=tmp_path_factory.mktemp("local"))


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def controls(session, mix: dict, settings=SETTINGS, method="average", blocks=None, **params) -> Controls:
    names = session.names
    return Controls(tuple(n in mix for n in names), tuple(mix.get(n, 0.0) for n in names), method, tuple(params.items()), settings,
                    blocks=tuple((blocks or {}).get(n, "") for n in names))


def files(images: handlers.Images) -> list[bytes]:
    return [Path(p).read_bytes() for p, _ in [*images.components, images.soup]]


MIXES = [
    ({"alpha": 1, "beta": 2}, "average", {}, None),
    ({"alpha": 1, "gamma": 1}, "task-arithmetic", {"lambda": 1.5}, None),
    ({"alpha": 1, "beta": 1, "gamma": 1}, "ties", {"density": 0.5}, None),
    ({"beta": 1, "gamma": 3}, "dare", {"density": 0.4, "seed": 3}, None),
    ({"alpha": 1, "beta": 1}, "add-difference", {"alpha": 0.7}, None),
    ({"alpha": 1, "gamma": 1}, "average", {}, {"gamma": "IN:0,M:0"}),
]


def test_replicas_render_the_bytes_the_studio_renders(routed, local, workers):
    page, reference = handlers.open_session(routed, None), handlers.open_session(local, None)
    for mix, method, params, blocks in MIXES:
        for seed in (1, 2):
            settings = SETTINGS.model_copy(update={"seed": seed})
            got = handlers.generate(routed, page, controls(page, mix, settings, method, blocks, **params))
            with threads(1):
                want = handlers.generate(local, reference, controls(reference, mix, settings, method, blocks, **params))
            assert got.soup[1] == want.soup[1]  # the caption: label, seed, prompt
            assert files(got) == files(want), (method, seed)
    assert sum(workers.answered.values()) >= len(MIXES) * 2 * 2
    # a slider release: the soup alone, again the same bytes
    release = controls(page, {"alpha": 0.3, "beta": 0.7}, SETTINGS, "ties", density=0.3)
    got = handlers.render_soup(routed, page, release)
    with threads(1):
        want = handlers.render_soup(local, reference, controls(reference, {"alpha": 0.3, "beta": 0.7}, SETTINGS, "ties", density=0.3))
    assert Path(got.soup[0]).read_bytes() == Path(want.soup[0]).read_bytes()


def test_workflows_and_the_ensemble_run_on_the_replicas(routed, local):
    page, reference = handlers.open_session(routed, None), handlers.open_session(local, None)
    c = controls(page, {"alpha": 1, "beta": 1, "gamma": 1}, method="task-arithmetic", **{"lambda": 1.2})
    r = controls(reference, {"alpha": 1, "beta": 1, "gamma": 1}, method="task-arithmetic", **{"lambda": 1.2})
    for run in (handlers.leave_one_out, handlers.ensemble):
        got = run(routed, page, c)
        with threads(1):
            want = run(local, reference, r)
        assert [cap for _, cap in got] == [cap for _, cap in want]
        assert [Path(p).read_bytes() for p, _ in got] == [Path(p).read_bytes() for p, _ in want], run.__name__


def test_renders_are_asked_from_a_thread_running_an_event_loop(routed, local):
    """Serve refuses a blocking wait inside a running event loop (Playwright's sync API runs one in
    the thread that drives the browser): the request waits in the workers' own threads (CI failed)."""
    page, reference = handlers.open_session(routed, None), handlers.open_session(local, None)

    async def in_a_loop():
        return handlers.render_soup(routed, page, controls(page, {"alpha": 2, "gamma": 1}))

    with ThreadPoolExecutor(1) as pool:  # a thread of its own: the test's may run a loop already (Playwright's, in CI)
        got = pool.submit(lambda: asyncio.run(in_a_loop())).result()
    with threads(1):
        want = handlers.render_soup(local, reference, controls(reference, {"alpha": 2, "gamma": 1}))
    assert Path(got.soup[0]).read_bytes() == Path(want.soup[0]).read_bytes()


def test_two_visitors_at_once(routed, local):
    pages = [handlers.open_session(routed, None) for _ in range(2)]
    mixes = [{"alpha": 1, "beta": 1}, {"beta": 1, "gamma": 2}]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: handlers.generate(routed, pages[i], controls(pages[i], mixes[i])), range(2)))
    reference = handlers.open_session(local, None)
    for images, mix in zip(got, mixes):
        with threads(1):
            want = handlers.generate(local, reference, controls(reference, mix))
        assert files(images) == files(want)


def test_an_added_shard_is_used_by_whichever_replica_answers(routed, local, workers, tiny_preset, tmp_path):
    """A file added in one session (after the replicas started) reaches every replica that is asked."""
    weights = {k: v + 0.02 for k, v in load_file(tiny_preset.parent / "gamma.safetensors").items()}
    save_file(weights, tiny_preset.parent / "delta.safetensors")
    page, reference = handlers.open_session(routed, None), handlers.open_session(local, None)
    handlers.add_shard(routed, page, "delta", "delta.safetensors")
    handlers.add_shard(local, reference, "delta", "delta.safetensors")
    studio = routed.get(None)
    # new mixes, one after another: Serve sends a new key to the replica holding the fewest
    answers = []
    for w in (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4):
        request = W.RenderRequest.of("soup", studio.preset.source, studio.make_mix({"alpha": 1, "delta": w}, shards=page.shards), SETTINGS)
        answers.append((w, *workers.submit(request).result()))
        if len({replica for _, replica, _ in answers}) == REPLICAS:
            break
    assert len({replica for _, replica, _ in answers}) == REPLICAS  # both replicas loaded delta and rendered with it
    for w, _, (rendered,) in answers:
        with threads(1):
            want = local.get(None).render_soup(local.get(None).make_mix({"alpha": 1, "delta": w}, shards=reference.shards), SETTINGS)
        assert rendered.label == want.label and "delta" in rendered.label
        assert rendered.image.tobytes() == want.image.tobytes()


def test_a_worker_error_reaches_the_page_as_the_studio_says_it(routed, local, tiny_preset, tmp_path):
    page, reference = handlers.open_session(routed, None), handlers.open_session(local, None)
    odd = SETTINGS.model_copy(update={"height": 20})  # not a multiple of 8: the pipeline refuses it
    messages = []
    for host, session in ((routed, page), (local, reference)):
        with pytest.raises(Exception) as caught:
            handlers.generate(host, session, controls(session, {"alpha": 1, "beta": 1}, odd))
        messages.append((type(caught.value), str(caught.value)))
    assert messages[0] == messages[1] and "divisible by 8" in messages[0][1]
    # a shard the replicas cannot read: one line naming the node and the path
    gone = tiny_preset.parent / "epsilon.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(tiny_preset.parent / "beta.safetensors").items()}, gone)
    handlers.add_shard(routed, page, "epsilon", "epsilon.safetensors")
    gone.unlink()
    with pytest.raises(StudioError, match=r"render worker on \S+: cannot read shard 'epsilon' at .*epsilon\.safetensors") as caught:
        handlers.render_soup(routed, page, controls(page, {"alpha": 1, "epsilon": 1}))
    assert "\n" not in str(caught.value)


def test_a_replica_killed_mid_run_costs_nothing(routed, local, workers, caplog):
    """4 clients rendering in a loop; one replica killed by its actor handle once they are under way:
    every request answered with the single-process bytes, one warning, the replicas back to 2."""
    pages = [handlers.open_session(routed, None) for _ in range(4)]
    plan = [[({"alpha": 1 + i, "beta": 1 + n % 3}, n) for n in range(10)] for i in range(4)]
    got: dict[tuple, bytes] = {}
    answered = threading.Semaphore(0)
    errors = []

    def client(i):
        for mix, seed in plan[i]:
            try:
                images = handlers.render_soup(routed, pages[i], controls(pages[i], mix, SETTINGS.model_copy(update={"seed": seed})))
                got[(i, seed)] = Path(images.soup[0]).read_bytes()
            except Exception as err:  # noqa: BLE001 - every one is reported below
                errors.append(repr(err))
            answered.release()

    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::"))
    retries = workers.retries
    with caplog.at_level(logging.WARNING):
        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        for _ in range(6):  # under way: six answers in
            assert answered.acquire(timeout=120)
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
        for t in clients:
            t.join(timeout=300)
    assert errors == [], errors
    assert len(got) == 40
    # Requests in flight on the killed replica were retried, with one warning for the replica. (It
    # is killed mid-run, usually mid-request; Serve may have had none of the 4 on it at that moment.)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    said = [(r.name, r.getMessage().startswith("a render worker was lost mid-request (")) for r in warnings]
    assert said == [("soup_ui.serving.workers", True)] * (workers.retries > retries), [r.getMessage() for r in warnings]
    deadline = time.time() + 120
    while workers.replicas() != REPLICAS and time.time() < deadline:
        time.sleep(0.5)
    assert workers.replicas() == REPLICAS
    reference = handlers.open_session(local, None)
    with threads(1):
        for i in range(4):
            for mix, seed in plan[i]:
                want = handlers.render_soup(local, reference, controls(reference, mix, SETTINGS.model_copy(update={"seed": seed})))
                assert got[(i, seed)] == Path(want.soup[0]).read_bytes()


def test_bad_worker_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="--worker-cpus"):
        W.serve_options(2, None, cpus=0)
    path = tmp_path / "serve.yaml"
    path.write_text("replicas: 3\n")
    with pytest.raises(ValueError, match="replicas: not a Serve deployment option"):
        W.serve_options(2, None, config=path)
    path.write_text("autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}\n")
    options = W.serve_options(None, "auto", config=path)
    assert options.address == "auto" and options.config["autoscaling_config"]["max_replicas"] == 4
    config = {"ray_actor_options": {"num_gpus": 1, "num_cpus": 4}, **options.config, "max_ongoing_requests": 4}
    assert W.describe(config) == "1 to 4 replicas (autoscaling), 4 CPU and 1 GPUs each, max_ongoing_requests 4"


@pytest.mark.parametrize("how", ["workers", "ray-address"])
def test_the_app_serves_through_render_workers(how, tiny_preset, local, tmp_path):
    """`python app.py --workers 2`, and `--ray-address` to a running Ray head with a Serve config:
    the API's images are the in-process studio's; stopping the server stops what it started."""
    import os
    import secrets
    import subprocess

    import numpy as np
    import psutil
    from conftest import app, free_port
    from gradio_client import Client
    from PIL import Image

    args = ["--preset", str(tiny_preset), "--models-dir", str(tiny_preset.parent), "--workers", "2"]
    head, env = None, {}
    if how == "ray-address":  # a one-node "cluster" with its own token, as a cluster's nodes share one
        port = free_port()
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                                 "--node-ip-address=127.0.0.1", "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
        config = tmp_path / "serve.yaml"
        config.write_text("max_ongoing_requests: 4\nray_actor_options: {num_cpus: 1}\n")
        args += ["--ray-address", f"127.0.0.1:{port}", "--serve-config", str(config)]
    try:
        with app(args, tmp_path, env) as (url, proc):
            client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
            gallery, info = client.predict("", "alpha=1,gamma=2", "a red apple", "", 5, 3, 4.0, "dpm++", 16, 16, "ties", "density=0.5", "", api_name="/render")
            started = psutil.Process(proc.pid).children(recursive=True)
            listening = {c.laddr.ip for p in [psutil.Process(proc.pid), *started] for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        log = (tmp_path / "server.log").read_text()
        assert "render workers: 2 replicas, 1 CPU and 0 GPUs each" in log and "(2 running)" in log
        if how == "ray-address":
            assert "max_ongoing_requests 4" in log
        else:  # the local Ray instance listens on loopback only, and went with the server
            assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
            psutil.wait_procs(started, timeout=60)
            assert [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        if head is not None:
            head.terminate()
            head.wait(timeout=60)
    studio = local.get(None)
    settings = RenderSettings(prompt="a red apple", seed=5, steps=3, guidance_scale=4.0, height=16, width=16)
    with threads(1):
        want = studio.render(studio.make_mix({"alpha": 1, "gamma": 2}, "ties", {"density": 0.5}), settings)
    got = [Image.open(item["image"]["path"] if isinstance(item["image"], dict) else item["image"]) for item in gallery]
    assert [item["caption"] for item in gallery][:2] == ["alpha", "gamma"]
    for image, rendered in zip(got, want):
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(rendered.image.convert("RGB")))


def test_a_replica_renders_interactive_requests_before_queued_workflow_images(tiny_preset):
    """On one replica, workflow images (background requests) wait while a slider release is queued:
    it waits for at most the image in progress, not for every queued workflow image."""
    worker = W.RenderWorker([str(tiny_preset)])
    studio = worker.studio(str(tiny_preset))
    mix = studio.make_mix({"alpha": 1, "beta": 1})
    queued = [W.RenderRequest.of("soup", tiny_preset, mix, SETTINGS.model_copy(update={"seed": 700 + i}), background=True) for i in range(12)]
    begin = studio.renderer.renders["soup"]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(worker.run, r) for r in queued]
        deadline = time.monotonic() + 120
        while studio.renderer.renders["soup"] == begin:
            assert time.monotonic() < deadline, "no workflow image was rendered"
            time.sleep(0.01)
        start = studio.renderer.renders["soup"]
        interactive = W.RenderRequest.of("soup", tiny_preset, studio.make_mix({"alpha": 1, "gamma": 1}), SETTINGS.model_copy(update={"seed": 999}))
        (rendered,) = worker.run(interactive)
        during = studio.renderer.renders["soup"] - start
        results = [f.result() for f in futures]
    assert during <= 2, during  # the image in progress, and the interactive one itself
    assert studio.renderer.renders["soup"] - begin == 13 and len(results) == 12
    assert rendered.label == "soup: 0.50 alpha + 0.50 gamma"


def test_two_requests_for_a_new_shard_load_it_once_and_hold_one_use(tiny_preset, tmp_path):
    """Issue 33, defect 7: two requests for a shard a replica has not loaded could both load it; the
    second's weights replaced the first's in the replica's LRU and the first use was never given
    back. A replica (without Ray) now loads a shard once, whoever asks at the same time."""
    import shutil
    import threading

    from soup_ui.modelfiles.checkpoints import sha256_file

    worker = W.RenderWorker([str(tiny_preset)], RuntimeOptions(warm_up=False))
    studio = worker.studio(str(tiny_preset))
    path = tmp_path / "delta.safetensors"
    shutil.copyfile(tiny_preset.parent / "gamma.safetensors", path)
    data = path.read_bytes()
    path.write_bytes(data[:-4] + bytes(4))  # other content: a shard this replica does not have
    ref = W.ShardRef("delta", str(path), sha256_file(path))
    second_asked, loads, real = threading.Event(), [], studio.pool.load

    def load(*args):
        loads.append(args)
        if len(loads) == 1:
            assert second_asked.wait(60), "the second request never came"
        return real(*args)

    studio.pool.load = load
    got = [None, None]

    def ask(i):
        if i == 1:
            second_asked.set()
        got[i] = worker.weights(studio, str(tiny_preset), ref)

    threads = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
    threads[0].start()
    while not loads:  # the first request is loading
        threading.Event().wait(0.01)
    threads[1].start()
    for t in threads:
        t.join(120)
    assert len(loads) == 1 and got[0] is got[1]
    assert studio.pool._users[ref.sha256] == 1  # the replica's one use, given back when it leaves the LRU


def test_what_serve_keeps_per_model_id_holds_no_released_weights(tiny_preset, tmp_path):
    """Issue 33, defect 7: Serve's multiplexed objects kept the weights a request used, so shards the
    replica released (past `keep_shards`) stayed in memory. What it keeps now names the shards only."""
    import gc
    import shutil
    import weakref

    worker = W.RenderWorker([str(tiny_preset)], RuntimeOptions(warm_up=False), keep_shards=1)
    studio = worker.studio(str(tiny_preset))
    requests = []
    for i, name in enumerate(["delta", "epsilon"]):
        path = tmp_path / f"{name}.safetensors"
        shutil.copyfile(tiny_preset.parent / "gamma.safetensors", path)
        data = path.read_bytes()
        path.write_bytes(data[:-4] + bytes([i + 1] * 4))  # content of its own: a shard this replica does not have
        shard = studio.add_shard(name, path)
        requests.append(W.RenderRequest.of("component", tiny_preset, Mix.alone(shard), SETTINGS))
        studio.remove_shard(name)
    kept = [worker.prepare(requests[0])]
    first = weakref.ref(worker._held[(str(tiny_preset), requests[0].shards[0].sha256)])
    kept.append(worker.prepare(requests[1]))  # keep_shards=1: the first shard is released
    gc.collect()
    assert first() is None, "the released shard's weights are still held"
    assert kept[0].shards == (requests[0].shards[0].sha256,)


def test_stopping_on_a_joined_cluster_deletes_only_our_app(monkeypatch):
    """Issue 33, defect 7: `serve.shutdown()` on a cluster the app joined stopped every Serve app
    there. Stopping deletes our app; Serve itself is shut down only on the instance we started."""
    calls = []
    monkeypatch.setattr(W.serve, "delete", lambda name, *a, **k: calls.append(("delete", name)))
    monkeypatch.setattr(W.serve, "shutdown", lambda *a, **k: calls.append(("serve.shutdown",)))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append(("ray.shutdown",)))
    W.Workers(None, joined=True).stop()
    assert calls == [("delete", W.APP), ("ray.shutdown",)]
    calls.clear()
    W.Workers(None).stop()
    assert calls == [("delete", W.APP), ("serve.shutdown",), ("ray.shutdown",)]
