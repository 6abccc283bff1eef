"""File-to-file soups: our streamed export against sd-mecha's merge of the same single files.

    python bench/stream_bench.py [--family sd1] [--k 3] [--repeats 3] [--folder /tmp/stream-bench] [--no-mecha] [--results bench/RESULTS.md]

K single files of the family's real shapes (UNet + VAE + text encoder in A1111's LDM layout, fp16,
random values: `family_check`'s shapes with a seed per file and tensor) are written once to
`--folder`. Then, each in a fresh process, timed from start to exit with its peak resident memory
(GNU time's %M; `apt-get install time` where it is missing), with the files in the page cache before every run:
- ours: `python -m soup_ui export --format single-file` of the K-way average (a preset whose base
  is the first file; the UNet is averaged, VAE and text encoder are the base's);
- sd-mecha 1.1.8 (pip install --no-deps sd-mecha==1.1.8 scipy fuzzywuzzy): `merge(n_average(...),
  merge_dtype=float32, output_dtype=float16, output=FILE)`, which averages every key (UNet, VAE
  and text encoder). Medians of `--repeats`; and how far the two UNets are apart, in fp16 steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from family_check import meta_states, random_tensor  # noqa: E402

from soup_ui.modelfiles import formats  # noqa: E402

MECHA = """
import sys, torch, sd_mecha
files, out = sys.argv[1:-1], sys.argv[-1]
sd_mecha.merge(sd_mecha.n_average(*[sd_mecha.model(f) for f in files]), merge_dtype=torch.float32, output_dtype=torch.float16, output=out)
"""


def write_shards(family: str, k: int, folder: Path) -> list[Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    states, files = None, []
    for i in range(k):
        path = folder / f"{family}-{i}.safetensors"
        files.append(path)
        if path.is_file():
            continue
        states = states or meta_states(family)
        tensors = {c: {n: random_tensor(f"{i}/{c}", n, s) for n, s in shapes.items()} for c, (_, shapes) in states.items()}
        texts = [tensors[c] for c in ("text_encoder", "text_encoder_2") if c in tensors]
        single = formats.ldm_checkpoint(tensors["unet"], states["unet"][0], tensors["vae"], states["vae"][0], texts, family)
        save_file({n: t.contiguous() for n, t in single.items()}, str(path))
        del tensors, single
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
    return files


def cached(files: list[Path]) -> None:
    """Read the files once, so that every run finds them in the page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of a command in its own process, through GNU time: a process
    forked from this one would count this one's memory as its own (Linux keeps the peak across
    fork and exec), `time` is small."""
    import tempfile

    with tempfile.NamedTemporaryFile("w+") as out, tempfile.TemporaryFile() as log:  # not a pipe: a progress bar would fill it and block
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", out.name, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {log.read().decode()[-2000:]}")
        seconds, kilobytes = out.read().split()[-2:]
    return float(seconds), int(kilobytes) / 1e6


def unet_gap(ours: Path, theirs: Path) -> tuple[int, float]:
    """How many UNet tensors differ, and the largest difference in fp16 steps (of the larger value)."""
    from safetensors import safe_open

    differ, worst = 0, 0.0
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        for name in a.keys():  # noqa: SIM118
            if not name.startswith(formats.LDM_PREFIX):
                continue
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
            if not torch.equal(x, y):
                differ += 1
                step = torch.finfo(torch.float16).eps * torch.maximum(x.abs(), y.abs()).clamp_min(2**-14)
                worst = max(worst, float(((x - y).abs() / step).max()))
    return differ, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/stream-bench"))
    parser.add_argument("--no-mecha", action="store_true")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    files = write_shards(args.family, args.k, args.folder)
    preset = args.folder / f"{args.family}-{args.k}.yaml"
    shards = "\n".join(f"  - {{name: s{i}, path: {f}}}" for i, f in enumerate(files))
    preset.write_text(f"name: stream bench\nbase: {files[0]}\nshards:\n{shards}\n")
    ours_out, theirs_out = args.folder / "ours.safetensors", args.folder / "mecha.safetensors"
    ours_cmd = [sys.executable, "-m", "soup_ui", "export", "--preset", str(preset), "--mix", ",".join(f"s{i}=1" for i in range(args.k)),
                "--format", "single-file", "--overwrite", "--out", str(ours_out)]
    mecha_cmd = [sys.executable, "-c", MECHA, *map(str, files), str(theirs_out)]
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "sd-mecha": []}
    for _ in range(args.repeats):
        for name, cmd in (("ours", ours_cmd), ("sd-mecha", mecha_cmd)):
            if name == "sd-mecha" and args.no_mecha:
                continue
            cached(files)
            runs[name].append(measured(cmd))
            print(f"{name}: {runs[name][-1][0]:.1f} s, {runs[name][-1][1]:.2f} GB peak RSS", flush=True)
    size = files[0].stat().st_size / 1e9
    lines = [f"File-to-file soup, {args.family}, K = {args.k} single files of {size:.2f} GB (fp16), {os.cpu_count()} CPUs, "
             f"median of {args.repeats} (`python bench/stream_bench.py --family {args.family} --k {args.k}`):", "",
             "| | wall s | peak RSS GB | vs sd-mecha (time, RSS) |", "|---|---|---|---|"]
    med = {n: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r)) for n, r in runs.items() if r}
    for name, (t, m) in med.items():
        ratio = f"{t / med['sd-mecha'][0]:.2f}x, {m / med['sd-mecha'][1]:.2f}x" if "sd-mecha" in med else "-"
        lines.append(f"| {name} | {t:.1f} | {m:.2f} | {ratio} |")
    if "sd-mecha" in med:
        differ, worst = unet_gap(ours_out, theirs_out)
        lines += ["", f"UNet tensors that differ between the two outputs: {differ}, at most {worst:.2f} fp16 steps."]
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
