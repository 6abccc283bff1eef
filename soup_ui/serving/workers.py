"""Render workers on Ray Serve: the page stays the one ingress, the images are made by replicas.

`python app.py --workers N` (or `--ray-address ADDRESS`) serves the page from this process and
sends every image it needs to a Ray Serve deployment of render replicas:

- the page keeps every visitor's session (shards, mix, tickets) and a lean CPU `Studio` per preset
  (it validates added files, builds the `Mix`, checks settings; it never merges or denoises);
- what goes out is a `RenderRequest`: plain values only (the preset file, the shards' names, paths
  and content hashes, the recipe, the render settings);
- each replica (`RenderWorker`) holds a `Studio` per preset it was asked for, with the base and the
  shards it needs, pooled by content hash, and its caches of images;
- requests are routed with Serve's model multiplexing, keyed by the mix (a component: by its
  shard's hash), so a repeated mix reaches the replica that has its hybrid and images. Routing is a
  preference: any replica gives the same bytes;
- a replica lost mid-request (killed, out of memory) costs a retry on another; Serve restarts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError

from ..engine.mix import Mix
from ..engine.pool import Shard, Weights
from ..engine.render import Rendered
from ..engine.studio import BACKGROUND, RuntimeOptions, Studio
from ..errors import StudioError
from ..modelfiles.presets import Recipe, RenderSettings, load_preset

logger = logging.getLogger(__name__)

APP = "soup-studio"  # the Serve application's name
# Ray binds its servers (GCS, raylet, workers, agents) to 127.0.0.1 only when it does not run as a
# cluster, which this variable decides when ray is first imported (Ray resolves a 127.0.0.1 node
# address to the machine's own). A local instance sets it to "0"; joining a cluster must not.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEPLOYMENT = "RenderWorker"
KINDS = ("component", "soup", "batch", "ensemble", "export")
EXPORTS = ("unet", "single-file", "pipeline")


@dataclass(frozen=True)
class ShardRef:
    """A shard as a worker finds it: by name (labels), path (shared storage) and content hash."""

    name: str
    path: str
    sha256: str

    @classmethod
    def of(cls, shard: Shard) -> ShardRef:
        return cls(shard.name, str(Path(shard.path).resolve()), shard.sha256)


@dataclass(frozen=True)
class RenderRequest:
    """One piece of work for a render worker, as plain values: which preset, which shards, the mix
    as a recipe (weights as entered, method, parameters, text-encoder flag, block weights) and the
    render settings; `kind` says what to make of it."""

    kind: str  # one of KINDS
    preset: str  # the preset file (absolute; readable on every node)
    shards: tuple[ShardRef, ...]
    recipe: Recipe  # the mix, and in `render` the settings of a single image
    batch: tuple[RenderSettings, ...] = ()  # kind "batch": the settings of each image
    background: bool = False  # a workflow image: waits while interactive work is queued on its replica
    out: str = ""  # kind "export": the file or folder to write (shared storage)
    export: str = "unet"  # kind "export": one of EXPORTS
    overwrite: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"render request kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.kind == "export" and self.export not in EXPORTS:
            raise ValueError(f"export {self.export!r}: one of {', '.join(EXPORTS)}")

    @classmethod
    def of(cls, kind: str, preset: Path | str, mix: Mix, settings: RenderSettings, **more) -> RenderRequest:
        refs = tuple(ShardRef.of(s) for s in mix.shards)
        return cls(kind, str(Path(preset).resolve()), refs, Recipe.of(None, mix, settings), **more)

    @property
    def model_id(self) -> str:
        """The multiplexing key: what the replica that answers should already hold. A component: its
        shard's content (and own text encoder); anything else: the mix's content, method and weights."""
        r = self.recipe
        if self.kind == "component":
            return f"shard-{self.shards[0].sha256[:32]}{'-text' if r.text_encoders else ''}"
        # the content hashes and the recipe's weights, method, parameters, blocks (names aside)
        names = {s.name: s.sha256 for s in self.shards}
        what = repr((self.preset, sorted((names[n], w) for n, w in r.mix.items()), r.method, sorted((k, names.get(v, v) if isinstance(v, str) else v) for k, v in r.params.items()),
                     r.text_encoders, sorted((names[n], str(v)) for n, v in r.blocks.items())))
        return "mix-" + hashlib.sha256(what.encode()).hexdigest()[:32]


class RenderWorker:
    """A render replica: a `Studio` per preset (loaded before the replica takes requests), shard
    weights pooled by content hash, images cached by the Studio. Usable without Ray (`run`): the
    Serve deployment (`ServedWorker`) is this class with Serve's routing around it."""

    def __init__(self, presets: list[str], options: RuntimeOptions = RuntimeOptions(), keep_shards: int = 16):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.options = options
        self.node = socket.gethostname()
        self._studios: dict[str, Studio] = {}
        self._lock = threading.Lock()
        self._held: LRUCache = LRUCache(keep_shards)  # (preset, sha256) -> Weights this replica loaded itself
        self._loading: dict[tuple, threading.Lock] = {}  # (preset, sha256) -> held while that shard loads
        for preset in presets:  # before the first request: a replica that is still loading takes none
            self.studio(preset)

    def studio(self, preset: str) -> Studio:
        with self._lock:
            if preset not in self._studios:
                if not os.access(preset, os.R_OK):
                    raise StudioError(f"render worker on {self.node}: cannot read the preset {preset} (it must be on storage every node reads)")
                self._studios[preset] = Studio(load_preset(Path(preset)), self.options)
            return self._studios[preset]

    def weights(self, studio: Studio, preset: str, ref: ShardRef) -> Weights:
        """The pooled weights of a shard, by content hash: the preset's own, or loaded from its path."""
        for shard in studio.shards.values():
            if shard.sha256 == ref.sha256:
                return shard.weights
        key = (preset, ref.sha256)
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # requests for the same new shard at once: one loads it, the others find it held
            with self._lock:
                held = self._held.get(key)
            if held is not None:
                return held
            if not os.access(ref.path, os.R_OK):
                raise StudioError(f"render worker on {self.node}: cannot read shard {ref.name!r} at {ref.path} (model folders and uploads must be on storage every node reads)")
            weights = studio.pool.load(ref.path, ref.name)
            if weights.sha256 != ref.sha256:
                studio.pool.release(weights)
                raise StudioError(f"shard {ref.name!r}: {ref.path} changed since it was added (its content hash differs); add it again")
            with self._lock:
                before = dict(self._held)
                self._held[key] = weights
                gone = [w for k, w in before.items() if k not in self._held]  # the least recently used, past keep_shards
        for w in gone:
            studio.pool.release(w)
        return weights

    def prepare(self, request: RenderRequest) -> Prepared:
        """Load what the request needs; what Serve keeps for its model id names the shards by
        hash and holds no weights, so the replica's own LRU (`keep_shards`) bounds its memory."""
        studio = self.studio(request.preset)
        for ref in request.shards:
            self.weights(studio, request.preset, ref)
        return Prepared(tuple(ref.sha256 for ref in request.shards))

    def mix(self, request: RenderRequest) -> tuple[Studio, Mix]:
        """The request's studio and its Mix, built as the page built it."""
        studio = self.studio(request.preset)
        view = {ref.name: Shard(ref.name, self.weights(studio, request.preset, ref)) for ref in request.shards}
        r = request.recipe
        return studio, Mix.build(view, r.mix, r.method, r.params, r.text_encoders, r.blocks, studio.blocks)

    def run(self, request: RenderRequest):
        """Do the request: a list of `Rendered` (component, soup, ensemble), a list of images (batch)
        or the path written (export)."""
        from ..engine import workflows

        studio, mix = self.mix(request)
        settings = request.recipe.render
        if not request.background:
            return self._run(studio, mix, request, settings, workflows)
        with studio.lock.background():
            return self._run(studio, mix, request, settings, workflows)

    @staticmethod
    def _run(studio: Studio, mix: Mix, request: RenderRequest, settings: RenderSettings, workflows):
        if request.kind == "component":
            return [studio.render_component(mix.shards[0], settings, text_encoders=mix.text_encoders)]
        if request.kind == "soup":
            return [studio.render_soup(mix, settings)]
        if request.kind == "batch":
            return studio.render_soup_batch(mix, list(request.batch))
        if request.kind == "ensemble":
            return list(workflows.ensemble(studio, mix, settings))
        return str(studio.export(request.export, mix, request.out, overwrite=request.overwrite))


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=8, health_check_period_s=5, graceful_shutdown_timeout_s=5)
class ServedWorker(RenderWorker):
    """The Serve deployment: requests arrive with a multiplexed model id (RenderRequest.model_id);
    the "model" a replica keeps for an id is the shard weights that request needed (Serve's LRU, per
    replica), so requests for a mix it has seen go to it."""

    def __init__(self, presets: list[str], options: RuntimeOptions = RuntimeOptions(), keep_shards: int = 16):
        import torch

        cpus = _assigned_cpus()
        if cpus:  # torch's threads as many as the CPUs Ray gave this replica
            torch.set_num_threads(cpus)
        if os.environ.get(LOOPBACK_ONLY) == "0":  # a local instance (the variable reaches its processes)
            _replica_grpc_on_loopback()
        super().__init__(presets, options, keep_shards)
        self._wanted: dict[str, RenderRequest] = {}

    @serve.multiplexed(max_num_models_per_replica=32)
    async def prepared(self, model_id: str) -> Prepared:
        request = self._wanted.get(model_id)
        if request is None:  # a concurrent request for the same id took it: `run` loads what it needs
            return Prepared()
        return await asyncio.to_thread(self.prepare, request)

    async def __call__(self, request: RenderRequest):
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            self._wanted[model_id] = request
            await self.prepared(model_id)
            self._wanted.pop(model_id, None)
        answer = await asyncio.to_thread(self.run, request)
        return serve.get_replica_context().replica_id.unique_id, answer


@dataclass(frozen=True)
class Prepared:
    """What Serve keeps for a multiplexed id: the content hashes of the shards the request used
    (never the weights: those are the replica's to release)."""

    shards: tuple[str, ...] = ()


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on [::] (every interface)
    whatever the node's address; on a local instance, where every Ray server is on loopback, this one
    is moved there too (tests/test_workers.py checks every listening socket of the app)."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server

    def on_loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    replica.add_port_to_grpc_server = on_loopback


def _assigned_cpus() -> int:
    import ray

    return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))


# -- the page's side -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerOptions:
    """How many replicas and where: Serve's own options (`serve` config keys) where given."""

    replicas: int = 1
    address: str | None = None  # a Ray cluster to join; None: start a local one (loopback only)
    cpus: float = 1.0  # per replica
    gpus: float | None = None  # per replica; None: 1 where this machine has a GPU, else 0
    config: dict = field(default_factory=dict)  # Serve deployment options (autoscaling_config, max_ongoing_requests, ...)


def serve_options(replicas: int | None, address: str | None, cpus: float = 1.0, gpus: float | None = None, config: Path | None = None) -> WorkerOptions:
    """WorkerOptions from the command line; `config`: a YAML file of Serve deployment options.
    ValueError naming what is wrong."""
    import yaml

    extra = {}
    if config is not None:
        try:
            extra = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"--serve-config {config}: {err}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--serve-config {config}: give a mapping of Serve deployment options (autoscaling_config, max_ongoing_requests, ...)")
        unknown = sorted(set(extra) - SERVE_KEYS)
        if unknown:
            raise ValueError(f"--serve-config {config}: {', '.join(unknown)}: not a Serve deployment option this studio passes on ({', '.join(sorted(SERVE_KEYS))})")
    if cpus <= 0 or (gpus is not None and gpus < 0):
        raise ValueError("--worker-cpus must be above 0 and --worker-gpus at least 0")
    return WorkerOptions(replicas or 1, address, cpus, gpus, extra)


SERVE_KEYS = {"num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "ray_actor_options", "health_check_period_s",
              "health_check_timeout_s", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "placement_group_bundles", "placement_group_strategy",
              "max_replicas_per_node"}

def describe(config: dict) -> str:
    """Serve deployment options as the log and the page say them: "2 replicas, 1 CPU and 0 GPUs each"."""
    actor = config.get("ray_actor_options") or {}
    auto = config.get("autoscaling_config")
    count = f"{auto.get('min_replicas', 1)} to {auto.get('max_replicas', 1)} replicas (autoscaling)" if auto else f"{config.get('num_replicas', 1)} replicas"
    each = f"{actor.get('num_cpus', 1):g} CPU and {actor.get('num_gpus', 0):g} GPUs each"
    rest = [f"{k} {v}" for k, v in config.items() if k not in ("num_replicas", "autoscaling_config", "ray_actor_options")]
    return ", ".join([count, each, *rest])


# A replica lost mid-request (killed, out of memory, its node gone): Ray's and Serve's own types.
LOST = (RayActorError, WorkerCrashedError, NodeDiedError, DeploymentUnavailableError)  # RayActorError: ActorDiedError, ActorUnavailableError


class Workers:
    """The page's handle on the render replicas: `ask` sends a request and returns what the replica
    returns, the replica's own error re-raised as it was (one line), a lost replica retried once."""

    def __init__(self, handle, pool_size: int = 32, joined: bool = False):
        self.handle = handle
        self.joined = joined  # on a cluster this process joined (--ray-address), other apps may be served there
        self.pool = ThreadPoolExecutor(pool_size, thread_name_prefix="render-request")
        self.retries = 0
        self.answered: Counter[str] = Counter()  # requests answered, by replica
        self.described = "render workers"
        self.most = 1  # replicas at most (autoscaling's max_replicas)
        self._lost: set = set()  # replicas (actor ids) seen lost: one warning each

    @classmethod
    def start(cls, presets: list[Path], runtime: RuntimeOptions, options: WorkerOptions) -> Workers:
        """Join or start Ray, deploy the replicas (each loads the presets before it serves) and wait
        until they are up."""
        import ray

        import soup_ui

        package = str(Path(soup_ui.__file__).parent)
        if not ray.is_initialized():
            if options.address:
                ray.init(address=options.address, runtime_env={"py_modules": [package]}, log_to_driver=False)
            else:
                if os.environ.get(LOOPBACK_ONLY) != "0":
                    logger.warning("Ray's servers listen on every interface (token-protected): set %s=0 before ray is imported for loopback only "
                                   "(app.py does)", LOOPBACK_ONLY)
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env={"py_modules": [package]})
        serve.start(proxy_location="Disabled")
        gpus = options.gpus
        if gpus is None:
            import torch

            gpus = 1 if torch.cuda.is_available() else 0
        actor = {"num_cpus": options.cpus, "num_gpus": gpus, **options.config.get("ray_actor_options", {})}
        config = {"num_replicas": options.replicas, **options.config, "ray_actor_options": actor}
        if "autoscaling_config" in options.config:
            config.pop("num_replicas", None)
        app = ServedWorker.options(**config).bind([str(Path(p).resolve()) for p in presets], runtime)
        handle = serve.run(app, name=APP, route_prefix=None)
        # Serve's own warnings about a lost replica would repeat what `ask` says once, in its words
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        workers = cls(handle, joined=bool(options.address))
        workers.described = describe(config)
        workers.most = int((config.get("autoscaling_config") or {}).get("max_replicas") or config.get("num_replicas") or 1)
        logger.info("render workers: %s (%d running)", workers.described, workers.replicas())
        return workers

    # The page's own Studio when renders go to workers: it only validates files, builds mixes and
    # checks settings, on the CPU, its shards read from their files (never merged here).
    PAGE_OPTIONS = RuntimeOptions(device="cpu", dtype="float32", memory="lean", warm_up=False)

    @property
    def loader(self) -> Callable:
        """A StudioHost loader: RoutedStudios that send their work to these workers."""

        def load(preset, options: RuntimeOptions, progress=None) -> RoutedStudio:
            return RoutedStudio(preset, options, progress, self)

        return load

    def submit(self, request: RenderRequest) -> Future:
        """A future of (the replica that answered, its answer). The request is sent and waited for
        in this object's own threads, never in the caller's: Serve refuses a blocking wait in a
        thread that runs an event loop (Playwright's, a notebook's)."""
        return self.pool.submit(self._answer, request)

    def ask(self, request: RenderRequest):
        """The replica's answer to `request`: its own error re-raised as it was, a lost replica
        retried once on another."""
        return self.submit(request).result()[1]

    def _answer(self, request: RenderRequest) -> tuple[str, object]:
        try:
            return self._once(request)
        except Exception as err:  # noqa: BLE001 - told apart below
            if not isinstance(err, LOST) and not isinstance(getattr(err, "cause", None), LOST):
                raise _own(err) from None
            self.retries += 1
            actor = str(getattr(err, "actor_id", None) or getattr(getattr(err, "cause", None), "actor_id", None) or type(err).__name__)
            if actor not in self._lost:
                self._lost.add(actor)
                logger.warning("a render worker was lost mid-request (%s); its requests are retried on another", type(err).__name__)
        try:
            return self._once(request)
        except Exception as err:  # noqa: BLE001
            raise _own(err) from None

    def _once(self, request: RenderRequest) -> tuple[str, object]:
        replica, answer = self.handle.options(multiplexed_model_id=request.model_id).remote(request).result()
        self.answered[replica] += 1
        return replica, answer

    def replicas(self) -> int:
        """Running replicas of the deployment (Serve's status)."""
        status = serve.status().applications[APP].deployments[DEPLOYMENT]
        return status.replica_states.get("RUNNING", 0)

    def stop(self) -> None:
        """Stop our replicas: on a joined cluster only our Serve app (never the cluster's other
        apps), on the local instance this process started Serve and Ray too."""
        import ray

        self.pool.shutdown(wait=False, cancel_futures=True)
        serve.delete(APP)
        if not self.joined:
            serve.shutdown()
        ray.shutdown()  # on a joined cluster: this process disconnects, the cluster runs on


def _own(err: BaseException) -> BaseException:
    """The replica's own exception (Ray wraps it in a RayTaskError): StudioError, ValueError, ..."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, Exception):
        return cause
    return StudioError(f"render worker: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")


class RoutedStudio:
    """The page's Studio when renders go to workers. It composes a lean CPU `Studio` of the preset
    (`local`: shards validated and hashed, mixes built, settings checked, all on the page's side)
    and the workers, which make every image, ensemble and export. Only what the page reads of the
    preset is taken from `local` (LOCAL); anything else, such as merging into its denoiser, is
    refused, so no render can silently happen on the page's copy."""

    LOCAL = frozenset({"preset", "options", "shards", "failed", "kind", "family", "blocks", "renderer", "pool", "lock", "hybrid", "pipe",
                       "base_specs", "base_tensors", "variant", "make_mix", "add_shard", "remove_shard"})

    def __init__(self, preset, options: RuntimeOptions, progress, workers: Workers):
        self.local = Studio(preset, options, progress)
        self.workers = workers

    def __getattr__(self, name: str):
        if name in RoutedStudio.LOCAL:
            return getattr(self.local, name)
        raise AttributeError(f"RoutedStudio.{name}: the render workers do this, not the page's copy of the preset")

    @property
    def runs_on(self) -> str:
        return f"rendered by Ray Serve replicas, {self.workers.replicas()} running"

    @property
    def memory_plan(self) -> str:
        return f"render workers: {self.workers.described}; each replica plans where its shards live from its own device's free memory"

    @property
    def lean(self) -> bool:
        return False  # the page's copy reads its files; the replicas hold theirs as they plan

    def _request(self, kind: str, mix: Mix, settings: RenderSettings, **more) -> RenderRequest:
        more.setdefault("background", self.lock.priority == BACKGROUND)  # a workflow's images (lock.background() in this thread)
        return RenderRequest.of(kind, self.preset.source, mix, settings, **more)

    def render_component(self, shard: Shard, settings: RenderSettings, *, text_encoders: bool = False) -> Rendered:
        self.renderer.check(settings)
        return self.workers.ask(self._request("component", Mix.alone(shard, text_encoders), settings))[0]

    def render_soup(self, mix: Mix, settings: RenderSettings) -> Rendered:
        self.renderer.check(settings)
        return self.workers.ask(self._request("soup", mix, settings))[0]

    def render(self, mix: Mix, settings: RenderSettings, progress: Callable | None = None) -> list[Rendered]:
        """The components and the soup at once, each where its weights are."""
        report = progress or (lambda f, d: None)
        self.renderer.check(settings)
        requests = [self._request("component", Mix.alone(s, mix.text_encoders), settings) for s in mix.shards] + [self._request("soup", mix, settings)]
        futures = [self.workers.submit(r) for r in requests]
        out = []
        for i, future in enumerate(futures):
            report(i / len(futures), f"rendering {'the soup' if i == len(futures) - 1 else mix.shards[i].name}")
            out.append(future.result()[1][0])
        report(1.0, "done")
        return out

    def render_soup_batch(self, mix: Mix, batch: list[RenderSettings], batch_size: int = 64):
        for settings in batch:
            self.renderer.check(settings)
        return self.workers.ask(self._request("batch", mix, batch[0], batch=tuple(batch)))

    def render_ensemble(self, mix: Mix, settings: RenderSettings) -> tuple[Rendered, Rendered]:
        self.renderer.check(settings)
        ensemble, soup = self.workers.ask(self._request("ensemble", mix, settings, background=True))
        return ensemble, soup

    def export(self, kind: str, mix: Mix, out, overwrite: bool = False) -> Path:
        return Path(self.workers.ask(self._request("export", mix, RenderSettings(), out=str(Path(out).resolve()), export=kind, overwrite=overwrite)))


