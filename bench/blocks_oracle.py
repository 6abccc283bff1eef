"""Block weights against a peer: sd-mecha's SuperMerger-block weighted sum of two SD-1.5 single files.

    python bench/blocks_oracle.py [--folder /tmp/stream-bench] [--results bench/RESULTS.md]

Two single files of SD 1.5's real shapes (UNet + VAE + text encoder in A1111's LDM layout, fp16,
random values; `stream_bench`'s files, written once) are merged per block with alpha_b drawn for
each of SuperMerger's 26 blocks (BASE, IN00-IN11, M00, OUT00-OUT11):
- ours: `python -m soup_ui export --format single-file --mix s0=1,s1=1 --blocks s0=<1 - alpha> --blocks s1=<alpha>`
  (per block, the weights normalized: (1 - alpha_b) A + alpha_b B);
- sd-mecha 1.1.8 (pip install --no-deps sd-mecha==1.1.8 scipy fuzzywuzzy): `weighted_sum(A, B,
  alpha=convert(literal(alphas, "sd1-supermerger_blocks"), "sd1-ldm"))`, its SuperMerger block map.
Every UNet tensor is compared (the export writes the base's VAE and text encoder; sd-mecha merges
those too, with BASE): how many differ, and by how many fp16 steps at most. A slow check (two 2 GB
files, minutes), so it lives here, outside the default test run.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream_bench import unet_gap, write_shards  # noqa: E402

BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
MECHA = """
import json, sys, torch, sd_mecha
a, b, out, alphas = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
alpha = sd_mecha.convert(sd_mecha.literal(alphas, "sd1-supermerger_blocks"), "sd1-ldm")
recipe = sd_mecha.weighted_sum(sd_mecha.model(a, "sd1-ldm"), sd_mecha.model(b, "sd1-ldm"), alpha=alpha)
sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float16, output=out)
"""


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/stream-bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="append the result to this Markdown file")
    args = parser.parse_args()
    files = write_shards("sd1", 2, args.folder)
    rng = random.Random(args.seed)
    alphas = {b: round(rng.uniform(0, 1), 3) for b in BLOCKS}
    alphas["IN05"], alphas["OUT07"] = 0.0, 1.0  # a block taken whole from A, one from B
    preset = args.folder / "oracle.yaml"
    preset.write_text(f"name: block oracle\nbase: {files[0]}\nshards:\n  - {{name: s0, path: {files[0]}}}\n  - {{name: s1, path: {files[1]}}}\n")
    ours, theirs = args.folder / "blocks-ours.safetensors", args.folder / "blocks-mecha.safetensors"
    line = lambda values: ",".join(f"{v:g}" for v in values)  # noqa: E731
    subprocess.run([sys.executable, "-m", "soup_ui", "export", "--preset", str(preset), "--mix", "s0=1,s1=1",
                    "--blocks", "s0=" + line(1 - alphas[b] for b in BLOCKS), "--blocks", "s1=" + line(alphas[b] for b in BLOCKS),
                    "--format", "single-file", "--overwrite", "--out", str(ours)], cwd=ROOT, check=True)
    mecha = subprocess.run([sys.executable, "-c", MECHA, str(files[0]), str(files[1]), str(theirs), json.dumps(alphas)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # its progress bar: one line per key
    if mecha.returncode != 0:
        raise SystemExit(f"sd-mecha failed: {mecha.stderr[-3000:]}")
    differ, worst = unet_gap(ours, theirs)
    text = (f"Block weights against sd-mecha 1.1.8's `sd1-supermerger_blocks` weighted sum, two SD-1.5 single files (fp16, random), "
            f"alpha per block {line(alphas[b] for b in BLOCKS)} (`python bench/blocks_oracle.py`): UNet tensors that differ: {differ}, "
            f"at most {worst:.2f} fp16 steps.")
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
    if worst > 1.0:
        raise SystemExit(f"ours and sd-mecha's differ by more than fp16 rounding: {worst:.2f} steps")


if __name__ == "__main__":
    main()
