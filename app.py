"""Diffusion Soup Studio: `python app.py` serves the studio on http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

# Before gradio is imported: no analytics, no telemetry. Offline mode is not forced: the studio reads
# only local files (shipped configs for single-file bases, the local Hub cache for Hub ids).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
DEFAULT_PRESET = HERE / "presets" / "emoji-styles.yaml"


def main(argv: list[str] | None = None) -> None:
    from soup_ui.engine import runtime

    parser = argparse.ArgumentParser(description=__doc__, parents=[runtime.parser()])
    parser.add_argument("--preset", type=Path, action="append", help="preset YAML file (repeatable; default: every preset in presets/)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--models-dir", type=Path, action="append", default=[],
        help="a folder the page may add shards from (repeatable; default: the embedded default's shards folder). Nothing else is opened",
    )
    parser.add_argument("--max-upload", default="16gb", help="largest file the page accepts as an upload (default 16gb)")
    parser.add_argument("--output-dir", type=Path, default=Path("soup-outputs"), help="where uploads, exports, recipes and saved presets go")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's; CPU images differ in the last bits between thread counts)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    workers = parser.add_argument_group("render workers (Ray Serve; see docs/serving.md)")
    workers.add_argument("--workers", type=int, metavar="N",
                         help="render on N Ray Serve replicas of a local Ray instance (loopback only, no dashboard); this process serves the page")
    workers.add_argument("--ray-address", metavar="ADDRESS",
                         help="join this Ray cluster instead (replicas may run on its other machines: --models-dir and --output-dir must be on storage every node reads)")
    workers.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    workers.add_argument("--worker-gpus", type=float, help="GPUs per replica (default: 1 where this machine has a GPU, else 0)")
    workers.add_argument("--serve-config", type=Path, metavar="YAML",
                         help="Serve deployment options for the replicas, Serve's own keys (autoscaling_config, max_ongoing_requests, ray_actor_options, ...)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers: give at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from soup_ui.cli import quiet_libraries
    from soup_ui.modelfiles.presets import list_presets
    from soup_ui.page.ui import StudioHost, build_ui, launch

    quiet_libraries()
    if args.threads is not None:
        import torch

        if args.threads < 1:
            parser.error("--threads: give at least 1")
        torch.set_num_threads(args.threads)
    presets = args.preset or list_presets(HERE / "presets")
    if not args.preset and DEFAULT_PRESET in presets:  # the embedded default first
        presets = [DEFAULT_PRESET] + [p for p in presets if p != DEFAULT_PRESET]
    if not presets:
        parser.error("no preset found in presets/; pass --preset FILE")
    for p in presets:
        if not Path(p).is_file():
            parser.error(f"--preset: no such file: {p}")
    options = runtime.RuntimeOptions.of(args, exporting=True)  # the page can export: the memory plan counts the export's copy
    models_dirs = args.models_dir or ([HERE / "assets" / "emoji" / "shards"] if DEFAULT_PRESET in presets else [])
    # The presets named on the command line (else the first, the embedded default) load before the
    # server answers; the others load when a visitor picks them.
    first = list(args.preset or presets[:1])
    workers = None
    if args.workers is not None or args.ray_address:
        if not args.ray_address:  # a local instance: Ray's own servers on loopback only (read when ray is imported)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from soup_ui.serving.workers import Workers, serve_options

        try:
            workers = Workers.start(first, options, serve_options(args.workers, args.ray_address, args.worker_cpus, args.worker_gpus, args.serve_config))
        except ValueError as err:
            parser.error(str(err))
        host = StudioHost(presets, Workers.PAGE_OPTIONS, loader=workers.loader, models_dirs=models_dirs, output_dir=args.output_dir)
        host.render_slots = 4 * workers.most  # renders at once: 4 per replica, at most
        # a terminated server stops its render workers too (set after Ray, which installs its own handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    else:
        host = StudioHost(presets, options, models_dirs=models_dirs, output_dir=args.output_dir)
    host.preload([Path(p).stem for p in first])
    try:
        launch(build_ui(host), port=args.port, share=args.share, max_file_size=args.max_upload)
    finally:
        if workers is not None:
            workers.stop()


if __name__ == "__main__":
    main()
    from soup_ui.maths import soup

    soup.exit(0)  # at once, even with a kernel compile running in the background
