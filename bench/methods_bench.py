"""Every registered merge method on SD-1.5-shaped fp16 shards, against the memory-bandwidth bound,
our plain average and sd-mecha's same method, in one run; plus where ours and sd-mecha's agree.

    python bench/methods_bench.py [--k 3] [--repeats 3] [--no-mecha] [--device cuda] [--results bench/RESULTS.md]

Shards are the base plus a small random task vector each (random weights with SD 1.5's UNet names
and shapes, 859.5M parameters, one flat buffer per model as the studio holds them). Linear methods
are timed against the bound (K sources, plus the base where its coefficient is not 0, read once
and the target written once, at the streaming rate `torch.add` reaches over whole buffers in the
same run); the others against our average. sd-mecha (pip install --no-deps sd-mecha==1.1.8 scipy fuzzywuzzy)
merges the same in-memory state dicts, fp32 maths, fp16 out. Agreement is measured where the two
formulations agree, in fp16 steps (units in the last place of the result).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import interleaved_medians, machine  # noqa: E402
from soup_bench import SD15_UNET, Quiet, random_shard, unet_shapes  # noqa: E402

from soup_ui.maths.methods import METHODS, merge_into  # noqa: E402
from soup_ui.maths.soup import FlatTensors  # noqa: E402

PARAMS = {"ties": {"density": 0.2}, "dare": {"density": 0.5}, "dare-ties": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.1}}


def shards_of(base: FlatTensors, k: int) -> list[FlatTensors]:
    """K finetunes: the base plus a task vector of about 1% of its scale each."""
    out = []
    for i in range(k):
        shard = FlatTensors(torch.empty_like(base.buffer), base.layout)
        g = torch.Generator().manual_seed(100 + i)
        for dst, src in zip(shard.buffer.split(1 << 24), base.buffer.split(1 << 24)):
            dst.copy_(src.float() + 0.01 * torch.empty(src.shape).normal_(generator=g))
        out.append(shard)
    return out


def ours(name: str, target, shards, base, k: int, only: str | None = None):
    """Our method `name` over the shards (or, with `only`, over that one tensor: a compile warm-up)."""
    m = METHODS[name]
    sources = shards[:2] if (m.max_shards == 2 or name == "add-difference") else shards
    weights = [1 / len(sources)] * len(sources)
    params = m.parse(PARAMS.get(name, {}))
    pick = (lambda d: {only: d[only]}) if only else (lambda d: d)  # noqa: E731
    return lambda: merge_into(pick(target), m, params, [pick(s) for s in sources], weights, pick(base) if m.needs_base else None)


def mecha_config(sample: FlatTensors) -> str:
    from sd_mecha.extensions import model_configs

    name = "sd15bench-diffusers_unet_only"
    try:
        model_configs.resolve(name)
    except (KeyError, ValueError):
        keys = {k: model_configs.KeyMetadata(list(t.shape), t.dtype) for k, t in sample.items()}
        model_configs.register(model_configs.ModelConfigImpl(name, {"unet": model_configs.ModelComponent(keys)}))
    return name


def mecha(name: str, shards, base):
    """sd-mecha's counterpart of our method `name` (None where it has none)."""
    import sd_mecha

    from sd_mecha.extensions.builtin.merge_methods import linear

    config = mecha_config(base)
    model = lambda s: sd_mecha.model(dict(s), config=config)  # noqa: E731
    deltas = lambda: [sd_mecha.subtract(model(s), model(base)) for s in shards]  # noqa: E731
    plus = lambda delta: linear.add_difference(model(base), delta, alpha=1.0)  # noqa: E731  base + a merged delta
    recipes = {
        "average": lambda: sd_mecha.n_average(*(model(s) for s in shards)),
        "add-difference": lambda: sd_mecha.add_difference(model(shards[0]), model(shards[1]), model(base), alpha=1.0),
        # TIES with the sign elected by the sum of the deltas (vote_sgn), as ours and mergekit's do
        "ties": lambda: plus(sd_mecha.ties_sum(*deltas(), k=0.2, vote_sgn=True)),
        # sd-mecha's DARE always elects a sign: it is our dare-ties
        "dare-ties": lambda: plus(sd_mecha.ties_sum_with_dropout(*deltas(), probability=0.5, k=1.0, vote_sgn=True, seed=0)),
        "della": lambda: plus(sd_mecha.ties_sum_with_dropout(*deltas(), probability=0.5, della_eps=0.2, k=1.0, vote_sgn=True, seed=0)),
        "slerp": lambda: sd_mecha.slerp(model(shards[0]), model(shards[1]), alpha=0.5),
        "model-stock": lambda: plus(sd_mecha.model_stock(*deltas())),
    }
    if name not in recipes:
        return None
    return lambda: sd_mecha.merge(recipes[name](), merge_dtype=torch.float32, output_dtype=torch.float16, tqdm=Quiet)


def fp16_steps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between two fp16 tensors in units of b's last place."""
    ulp = (torch.nextafter(b.abs(), torch.tensor(float("inf"), dtype=b.dtype)) - b.abs()).float()
    return float(((a.float() - b.float()).abs() / ulp).max())


def agreement(shards, base, target) -> list[str]:
    """Where the formulations agree, the largest difference in fp16 steps over all tensors."""
    lines = []
    cases = [("average", {}, None), ("add-difference", {"alpha": 1.0}, None), ("ties", {"density": 1.0}, "k=1.0")]
    for name, params, note in cases:
        run = mecha(name, shards, base)
        if name == "ties":  # at density 1 nothing is trimmed: sign election and the disjoint mean alone
            import sd_mecha
            from sd_mecha.extensions.builtin.merge_methods import linear

            config = mecha_config(base)
            model = lambda s: sd_mecha.model(dict(s), config=config)  # noqa: E731
            merged = sd_mecha.ties_sum(*[sd_mecha.subtract(model(s), model(base)) for s in shards], k=1.0, vote_sgn=True)
            recipe = linear.add_difference(model(base), merged, alpha=1.0)
            theirs = sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float16, tqdm=Quiet)
        else:
            theirs = run()
        m = METHODS[name]
        sources = shards[:2] if name == "add-difference" else shards
        merge_into(target, m, m.parse(params), sources, [1 / len(sources)] * len(sources), base if m.needs_base else None)
        if name == "ties":
            # A zero sum of the deltas elects sign 0 in sd-mecha (nothing kept: the base) and +1 in
            # peft, mergekit and ours: compare elsewhere and count those entries.
            zero = {k: sum(s[k].float() - base[k].float() for s in shards) == 0 for k in target}
            worst = max(fp16_steps(target[k][~zero[k]], theirs[k][~zero[k]]) for k in target)
            count = sum(int(z.sum()) for z in zero.values())
            note = f"{note}; {count:,} of {sum(t.numel() for t in target.values()):,} entries whose deltas sum to exactly 0 set apart"
        else:
            worst = max(fp16_steps(target[k], theirs[k]) for k in target)
        lines.append(f"| {name}{f' ({note})' if note else ''} | {worst:.0f} fp16 steps at most |")
    # Trimming alone: our k = int(density n) largest; sd-mecha keeps entries >= its kth value (one more).
    t = shards[0]["down_blocks.1.attentions.0.proj_in.weight"].float() - base["down_blocks.1.attentions.0.proj_in.weight"].float()
    from sd_mecha.extensions.builtin.merge_methods.ties import filter_top_k

    from soup_ui.maths.methods import magnitude_mask

    kept_ours, kept_theirs = int(magnitude_mask(t, 0.2).sum()), int((filter_top_k(t, 0.2) != 0).sum())
    lines.append(f"| ties trimming at density 0.2 (one tensor of {t.numel():,}) | ours keeps {kept_ours:,} (k = int(0.2 n) = {int(0.2 * t.numel()):,} and the entries tied with the k-th), sd-mecha {kept_theirs:,} (everything from its int(0.8 n)-th smallest up, with ties; fp16 deltas tie often) |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="runs of each linear method (median)")
    p.add_argument("--slow-repeats", type=int, default=1, help="runs of each other method (median)")
    p.add_argument("--no-mecha", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--results", help="append the table to this markdown file")
    p.add_argument("--small", action="store_true", help="SD 1.5's layout at 1/10 of its widths (a quick check of the script)")
    p.add_argument("--device", default="cpu", help="where the shards live and merge (cpu or cuda; sd-mecha runs on the CPU only here)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # sd-mecha warns on every merge that an in-memory recipe has no serialized form
    torch.set_grad_enabled(False)
    config = dict(SD15_UNET, block_out_channels=(32, 64, 128, 128), attention_head_dim=8) if args.small else SD15_UNET
    shapes = unet_shapes(config)
    base = random_shard(shapes, torch.float16, 0)
    shards = shards_of(base, args.k)
    if args.device != "cpu":  # drawn on the CPU (the same numbers on every device), then moved
        base, *shards = (FlatTensors(t.buffer.to(args.device), t.layout) for t in (base, *shards))
    target = FlatTensors.empty(shapes, torch.float16, args.device)
    nbytes = base.buffer.numel() * 2
    use_mecha = not args.no_mecha and args.device == "cpu"
    if use_mecha:
        try:
            import sd_mecha  # noqa: F401
        except ImportError as err:  # not installed, or a dependency --no-deps left out (fuzzywuzzy)
            print(f"sd-mecha cannot be imported ({err}): its columns are left empty")
            use_mecha = False
    out = torch.empty_like(base.buffer)
    copy = lambda: torch.add(base.buffer, shards[0].buffer, out=out)  # noqa: E731
    average = ours("average", target, shards, base, args.k)
    copy(), average()  # the baselines' first runs (the average's kernel compiles) are not timed
    lines = [
        f"### Merge methods, SD-1.5-shaped fp16 shards, K = {args.k} ({machine()})", "",
        f"Medians of {args.repeats} runs (linear methods) and {args.slow_repeats} (the others), interleaved with the bound and our average; "
        "compiled kernels warmed up first on one tensor (compiling takes a few seconds once per process and shard count).", "",
        "| method | ours (s) | x bound | x our average | sd-mecha (s) | ours vs sd-mecha |", "|---|---|---|---|---|---|",
    ]
    for name in args.methods.split(","):
        m = METHODS[name]
        largest = max(base, key=lambda n: base[n].numel())
        ours(name, target, shards, base, args.k, only=largest)()  # compiles this method's kernels (once per process), untimed
        fns = [copy, average, ours(name, target, shards, base, args.k)]
        theirs = mecha(name, shards, base) if use_mecha else None
        if theirs is not None:
            fns.append(theirs)
        repeats = args.repeats if m.linear else args.slow_repeats
        times = interleaved_medians(fns, repeats, warmup=1 if m.linear else 0)
        rate = 3 * nbytes / times[0]
        k = 2 if (m.max_shards == 2 or name == "add-difference") else args.k
        reads = k + (1 if m.linear and m.coefficients([1 / k] * k, m.parse(PARAMS.get(name, {})))[1] else 0)
        bound = (reads + 1) * nbytes / rate
        mecha_s = f"{times[3]:.2f}" if len(times) > 3 else "-"
        versus = f"{times[3] / times[2]:.1f}x faster" if len(times) > 3 and times[3] > times[2] else (f"{times[2] / times[3]:.1f}x slower" if len(times) > 3 else "-")
        row = f"| {name} | {times[2]:.2f} | {times[2] / bound:.2f} | {times[2] / times[1]:.2f} | {mecha_s} | {versus} |"
        print(row, flush=True)
        lines.append(row)
    if use_mecha:
        lines += ["", "Agreement with sd-mecha 1.1.8 on the same tensors:", "", "| method | largest difference |", "|---|---|"]
        lines += agreement(shards, base, target)
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
