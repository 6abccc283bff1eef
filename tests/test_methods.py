"""Each merge method against a reference computed independently here, on small tensors."""

import math

import pytest
import torch

from soup_ui.maths.methods import draws, kernels, selection, sparse
from soup_ui.maths.methods import METHODS, magnitude_mask, merge_into, method


def run(name, sources, weights, base=None, **params):
    """Merge {"w": tensor} sources with the registered method; returns the merged tensor."""
    m = method(name)
    target = {"w": torch.empty_like(sources[0])}
    merge_into(target, m, m.parse(params), [{"w": s} for s in sources], weights, None if base is None else {"w": base})
    return target["w"]


def ref_ties(base, thetas, weights, density, lam):
    """TIES as the issue writes it, element by element."""
    deltas = []
    for th in thetas:
        t = (th - base).flatten().tolist()
        k = int(density * len(t))
        keep = sorted(range(len(t)), key=lambda i: -abs(t[i]))[:k]
        deltas.append([t[i] if i in keep else 0.0 for i in range(len(t))])
    out = []
    for j in range(len(deltas[0])):
        s = sum(w * d[j] for w, d in zip(weights, deltas))
        sign = 1.0 if s >= 0 else -1.0
        num = sum(w * d[j] for w, d in zip(weights, deltas) if d[j] != 0 and math.copysign(1, d[j]) == sign)
        den = sum(w for w, d in zip(weights, deltas) if d[j] != 0 and math.copysign(1, d[j]) == sign)
        out.append(base.flatten()[j].item() + lam * (num / den if den else 0.0))
    return torch.tensor(out).view(base.shape)


def test_registry_lists_methods_with_params_and_references():
    assert {"average", "task-arithmetic", "add-difference", "ties", "dare", "dare-ties", "della", "slerp", "model-stock"} <= set(METHODS)
    for m in METHODS.values():
        assert m.summary and m.reference
        m.parse({})  # every default is valid
    assert METHODS["dare"].param_names() == ["density", "lambda", "seed", "rng"]
    assert METHODS["della"].param_names() == ["density", "epsilon", "lambda", "seed", "rng", "ranks"]


def test_average_and_task_arithmetic_are_the_weighted_sums():
    base, a, b = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    torch.testing.assert_close(run("average", [a, b], [0.25, 0.75]), 0.25 * a + 0.75 * b)
    got = run("task-arithmetic", [a, b], [0.25, 0.75], base, **{"lambda": 1.5})
    torch.testing.assert_close(got, base + 1.5 * (0.25 * (a - base) + 0.75 * (b - base)))


def test_add_difference_from_the_base_and_from_a_shard():
    base, a, b, c = (torch.randn(6) for _ in range(4))
    torch.testing.assert_close(run("add-difference", [a, b], [0.5, 0.5], base, alpha=0.7), a + 0.7 * (b - base))
    torch.testing.assert_close(run("add-difference", [a, b, c], [0.3, 0.3, 0.4], base, alpha=0.7, c="c"), a + 0.7 * (b - c))


def test_ties_matches_the_formula_with_sign_conflicts():
    base = torch.zeros(8)
    # entry 0: 3 vs -1 (+ wins); entry 1: -2 vs 1 (- wins); entry 2: small, trimmed; ...
    a = torch.tensor([3.0, -2.0, 0.01, 1.0, -4.0, 0.5, 2.0, -0.02])
    b = torch.tensor([-1.0, 1.0, 0.02, 1.5, 3.0, -0.5, 2.5, 0.03])
    got = run("ties", [a, b], [0.5, 0.5], base, density=0.75, **{"lambda": 1.0})
    torch.testing.assert_close(got, ref_ties(base, [a, b], [0.5, 0.5], 0.75, 1.0))
    assert got[0] == 3.0 and got[1] == -2.0  # the minority sign is left out, not averaged in
    base, thetas = torch.randn(7, 9), [torch.randn(7, 9) for _ in range(3)]
    got = run("ties", thetas, [0.2, 0.3, 0.5], base, density=0.4, **{"lambda": 1.3})
    torch.testing.assert_close(got, ref_ties(base, thetas, [0.2, 0.3, 0.5], 0.4, 1.3), atol=1e-5, rtol=1e-5)


def test_ties_density_zero_is_the_base_and_equal_weights_give_the_agreeing_mean():
    base, a, b = torch.randn(10), torch.randn(10), torch.randn(10)
    torch.testing.assert_close(run("ties", [a, b], [0.5, 0.5], base, density=0.0), base)
    got = run("ties", [a, b], [0.5, 0.5], base, density=1.0)
    da, db = a - base, b - base
    agree = torch.sign(da) == torch.sign(db)
    torch.testing.assert_close(got[agree], (base + (da + db) / 2)[agree])


def test_magnitude_mask_selects_the_k_largest_like_peft_on_large_tensors():
    from peft.utils.merge_utils import magnitude_based_pruning

    x = torch.randn(300, 700)  # past the sampled-threshold size
    for density in (0.01, 0.2, 0.5, 0.93):
        mask = magnitude_mask(x, density)
        assert int(mask.sum()) == int(density * x.numel())
        torch.testing.assert_close(x * mask, magnitude_based_pruning(x, density), rtol=0, atol=0)


def test_dare_density_one_is_task_arithmetic_and_zero_is_the_base():
    base, a, b = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    ta = run("task-arithmetic", [a, b], [0.4, 0.6], base, **{"lambda": 1.2})
    torch.testing.assert_close(run("dare", [a, b], [0.4, 0.6], base, density=1.0, **{"lambda": 1.2}), ta)
    torch.testing.assert_close(run("dare", [a, b], [0.4, 0.6], base, density=0.0), base)


M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32, on Python integers (the reference for the int32 tensor version)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def counter_uniform(seed: int, name: str, shard: int, j: int) -> float:
    """The documented counter draw of entry j of a shard: top 24 bits of the hash of the hashed counter
    (j + the tensor seed's low 32 bits) xor the shard's key, over 2^24."""
    key = draws.tensor_seed(seed, name) & M32
    return (lowbias32(lowbias32(j + key) ^ (((shard + 1) * 0x9E3779B9) & M32)) >> 8) / (1 << 24)


def test_dare_drops_with_the_seeded_counter_draw_and_rescales():
    base, a = torch.zeros(2000), torch.ones(2000)
    got = run("dare", [a], [1.0], base, density=0.25, seed=7)
    kept = got != 0
    assert torch.all(got[kept] == 4.0)  # rescaled by 1 / density
    assert 0.2 < kept.float().mean() < 0.3
    expected = torch.tensor([counter_uniform(7, "w", 0, j) < 0.25 for j in range(2000)])
    assert torch.equal(kept, expected)
    assert torch.equal(run("dare", [a], [1.0], base, density=0.25, seed=7), got)  # reproducible
    assert not torch.equal(run("dare", [a], [1.0], base, density=0.25, seed=8), got)


def test_dare_with_rng_torch_draws_as_recipes_before_the_counter():
    """rng 'torch': a CPU generator seeded from the seed and the tensor's name, one torch.rand per shard."""
    base, a = torch.zeros(2000), torch.ones(2000)
    kept = run("dare", [a], [1.0], base, density=0.25, seed=7, rng="torch") != 0
    g = torch.Generator("cpu").manual_seed(draws.tensor_seed(7, "w"))
    assert torch.equal(kept, torch.rand(2000, generator=g) < 0.25)


def test_counter_draws_are_uniform_independent_across_shards_and_the_same_compiled():
    """Each shard keeps its density's share, two shards' drops are independent (both kept: density^2),
    neighbours are uncorrelated, and the compiled kernel's int32 arithmetic wraps as eager's does
    (counters through the int32 range's ends, a length that leaves a vector tail)."""
    n = (1 << 20) + 13
    counter = torch.arange(n, dtype=torch.int32) + draws._int32((1 << 31) - 5000)
    u = draws.counter_uniforms(counter, 3)
    for x in u:
        assert abs(float((x < 0.3).float().mean()) - 0.3) < 0.003
        assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert abs(float(((u[0] < 0.3) & (u[1] < 0.3)).float().mean()) - 0.09) < 0.002
    assert abs(float(((u[1] < 0.5) & (u[2] < 0.5)).float().mean()) - 0.25) < 0.003
    assert abs(float(torch.corrcoef(torch.stack([u[0][1:], u[0][:-1]]))[0, 1])) < 0.005
    compiled = torch.compile(draws.counter_uniforms, dynamic=True)(counter, 3)
    for x, y in zip(u, compiled):
        assert torch.equal(x, y)
    for j in (0, 4999, 5000, 5001, n - 1):  # the int32 wrap at j = 5000
        assert u[2][j].item() == counter_uniform_at((1 << 31) - 5000 + j, 2)


def counter_uniform_at(counter: int, shard: int) -> float:
    return (lowbias32(lowbias32(counter) ^ (((shard + 1) * 0x9E3779B9) & M32)) >> 8) / (1 << 24)


def test_dare_ties_is_the_drop_then_the_sign_election():
    base, a, b = torch.randn(50), torch.randn(50), torch.randn(50)
    got = run("dare-ties", [a, b], [0.5, 0.5], base, density=0.5, seed=3)
    keep = [torch.tensor([counter_uniform(3, "w", i, j) < 0.5 for j in range(50)]) for i in range(2)]
    da = torch.where(keep[0], (a - base) / 0.5, torch.zeros(50))
    db = torch.where(keep[1], (b - base) / 0.5, torch.zeros(50))
    torch.testing.assert_close(got, ref_ties(base, [base + da, base + db], [0.5, 0.5], 1.0, 1.0), atol=1e-5, rtol=1e-5)


def test_della_keep_probabilities_follow_magnitude_rank():
    delta = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    p = sparse.rank_probabilities(delta, 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5]]))
    base, a = torch.zeros(1, 4000), torch.linspace(-1, 1, 4000).view(1, -1)
    for ranks in ("exact", "sampled"):
        got = run("della", [a], [1.0], base, density=0.5, epsilon=0.4, seed=1, ranks=ranks)
        kept = got != 0
        large, small = a.abs() > 0.75, a.abs() < 0.25
        assert kept[large].float().mean() > 0.75 and kept[small].float().mean() < 0.25
        probability = sparse.rank_probabilities(a, 0.5, 0.4)
        if ranks == "sampled":  # 64 evenly spaced entries of a linear ramp: near the exact shares
            probability = sparse._della_probabilities(a, method("della").parse({"density": 0.5, "epsilon": 0.4}))
            torch.testing.assert_close(probability, sparse.rank_probabilities(a, 0.5, 0.4), atol=0.015, rtol=0)
        torch.testing.assert_close(got[kept], (a / probability)[kept])  # each kept entry rescaled by its own probability


@pytest.mark.parametrize("shape", [(64, 3000), (320, 32, 3, 3), (5000,), (40, 7)])
def test_della_sampled_ranks_are_near_the_exact_ranks(shape):
    """ranks 'sampled' reads each row's rank curve off 64 evenly strided entries: on rows of
    differently scaled normal deltas, keep probabilities within 0.5 epsilon of the exact ranks'
    everywhere (the rows' extremes, beyond the sample's) and 0.1 epsilon on average, in
    [density - epsilon, density + epsilon]."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(*shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
    sampled = sparse._della_probabilities(delta, method("della").parse({"density": 0.5, "epsilon": 0.1}))
    error = (sampled - sparse.rank_probabilities(delta, 0.5, 0.1)).abs()
    assert float(error.max()) <= 0.05 and float(error.mean()) <= 0.01
    assert float(sampled.min()) >= 0.4 - 1e-6 and float(sampled.max()) <= 0.6 + 1e-6


def test_della_refuses_probabilities_outside_zero_one():
    with pytest.raises(ValueError, match="della: density - epsilon must be > 0 .* got density 0.05, epsilon 0.1"):
        method("della").parse({"density": 0.05})


def test_slerp_follows_the_arc_and_falls_back_to_lerp_for_parallel_tensors():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = run("slerp", [v0, v1], [0.5, 0.5])
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    got = run("slerp", [v0, v1], [2 / 3, 1 / 3])
    torch.testing.assert_close(got, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    p0, p1 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])  # parallel: the linear fallback
    torch.testing.assert_close(run("slerp", [p0, p1], [0.75, 0.25]), 0.75 * p0 + 0.25 * p1)


def test_model_stock_interpolates_by_the_task_vectors_angle():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(1.0), math.sin(1.0)])
    cos = math.cos(1.0)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(run("model-stock", [a, b], [0.5, 0.5], base), t * (a + b) / 2)
    opposite = run("model-stock", [a, -a], [0.5, 0.5], base + 0)
    torch.testing.assert_close(opposite, base)  # negative cosine counts as 0: the base


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("ties", {"density": 1.5}, "ties: density must be between 0 and 1, got 1.5"),
        ("dare", {"density": -0.1}, "dare: density must be between 0 and 1, got -0.1"),
        ("task-arithmetic", {"lambda": float("nan")}, "task-arithmetic: lambda = nan"),
        ("dare", {"dens": 0.3}, "dare has no parameter 'dens' \\(its parameters: density, lambda, seed, rng\\)"),
        ("della", {"rng": "philox"}, "della: rng = 'philox': Input should be 'counter' or 'torch'"),
        ("average", {"lambda": 2}, "average has no parameter 'lambda' \\(its parameters: none\\)"),
    ],
)
def test_bad_parameters_are_refused_naming_parameter_and_value(name, params, message):
    with pytest.raises(ValueError, match=message):
        method(name).parse(params)


def test_unknown_method_and_wrong_shard_count_are_refused():
    with pytest.raises(ValueError, match="unknown merge method 'tiess' \\(known: average, task-arithmetic"):
        method("tiess")
    with pytest.raises(ValueError, match="slerp merges exactly 2 shards; 3 selected"):
        method("slerp").check_shards(3)
    with pytest.raises(ValueError, match="model-stock merges at least 2 shards; 1 selected"):
        method("model-stock").check_shards(1)


def test_non_linear_methods_write_in_the_targets_dtype_and_keep_integer_buffers():
    base = {"w": torch.randn(3, 3).half(), "n": torch.tensor([5])}
    a = {"w": torch.randn(3, 3).half(), "n": torch.tensor([5])}
    b = {"w": torch.randn(3, 3).half(), "n": torch.tensor([5])}
    target = {"w": torch.empty(3, 3, dtype=torch.float16), "n": torch.tensor([0])}
    merge_into(target, method("ties"), method("ties").parse({"density": 1.0}), [a, b], [0.5, 0.5], base)
    expected = ref_ties(base["w"].float(), [a["w"].float(), b["w"].float()], [0.5, 0.5], 1.0, 1.0).half()
    assert torch.equal(target["w"], expected) and target["n"].item() == 5


@pytest.mark.parametrize(
    "name, params",
    [("ties", {"density": 0.3}), ("dare", {"density": 0.4, "seed": 2}), ("dare-ties", {"density": 0.4, "seed": 2}),
     ("della", {"density": 0.5, "epsilon": 0.2, "seed": 2}), ("della", {"density": 0.5, "epsilon": 0.2, "seed": 2, "ranks": "exact"})],
)
def test_the_compiled_kernels_give_the_eager_results(monkeypatch, name, params):
    """Large tensors run through compiled kernels (the same functions, fused): the same weights to
    within one fp16 step (fused multiply-adds may round the float32 sums differently)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 700, generator=g).half()
    sources = [(base.float() + 0.01 * torch.randn(300, 700, generator=g)).half() for _ in range(3)]
    eager = run(name, sources, [0.2, 0.3, 0.5], base, **params)
    monkeypatch.setattr(kernels, "FUSED_MIN_ELEMENTS", 1)
    fused = run(name, sources, [0.2, 0.3, 0.5], base, **params)
    assert not kernels._failed, kernels._failed
    step = (torch.nextafter(eager.abs(), torch.tensor(float("inf"), dtype=torch.float16)) - eager.abs()).float()
    assert float(((fused.float() - eager.float()).abs() / step).max()) <= 1


@pytest.mark.parametrize("shape", [(300, 700), (64, 32, 3, 3), (70_000,)])
def test_della_one_pass_gives_the_weights_of_probabilities_then_merge(monkeypatch, shape):
    """DELLA (sampled ranks, counter draws) computes each keep probability inside the merge kernel,
    over rows; the weights are bit for bit those of writing the probabilities out first and merging
    them with the flat counter kernel (the same draws: entry (r, c) counts r L + c), compiled."""
    monkeypatch.setattr(kernels, "FUSED_MIN_ELEMENTS", 1)
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g).half()
    sources = [(base.float() + s * torch.randn(shape, generator=g)).half() for s in (0.01, 0.03, 0.002)]
    p = method("della").parse({"density": 0.4, "epsilon": 0.15, "seed": 3})
    one_pass = torch.empty_like(base)
    sparse.della(one_pass, sources, [0.5, 0.3, 0.2], base, p, draws.Draws(3, "w"))
    probabilities = [sparse._della_probabilities(s.float() - base.float(), p) for s in sources]
    two_pass = torch.empty_like(base)
    sparse._dropped(two_pass, base, sources, [0.5, 0.3, 0.2], p, draws.Draws(3, "w"), probabilities, elect=True)
    assert not kernels._failed, kernels._failed
    assert torch.equal(one_pass, two_pass)
    assert 0 < int((one_pass != base).sum()) < base.numel()  # some entries kept, some dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("passes", [40, 1])
def test_probed_magnitude_thresholds_are_exact(monkeypatch, dtype, passes):
    """Large tensors find each shard's k-th magnitude by counting passes guided by a sample: exactly
    torch.kthvalue's, for distinct fp32 deltas, for fp16 ones (which tie on few values) and for a
    shard whose k-th magnitude is 0, and still exact when the passes run out (it then sorts)."""
    monkeypatch.setattr(kernels, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(selection, "PROBE_PASSES", passes)
    g = torch.Generator().manual_seed(6)
    base = torch.randn(500, 900, generator=g)
    sources = [(base + torch.randn(500, 900, generator=g) * s).to(dtype) for s in (0.01, 0.1)]
    sparse = torch.randn(500, 900, generator=g) * 0.03 * (torch.rand(500, 900, generator=g) < 0.3)  # 70% exact zeros
    sources.append((base + sparse).to(dtype))
    base = base.to(dtype)
    for density in (0.05, 0.2, 0.8):  # at 0.8 the sparse shard's k-th magnitude is 0
        got = selection.magnitude_thresholds(base, sources, density)
        k = int(density * base.numel())
        expected = [torch.kthvalue((s.float() - base.float()).abs().reshape(-1), base.numel() - k + 1).values for s in sources]
        assert torch.equal(got, torch.stack(expected)), density
        for s, t in zip(sources, got):  # k kept, and only values tied with the k-th beyond them
            a = (s.float() - base.float()).abs()
            assert int((a > t).sum()) < k <= int((a >= t).sum())


def test_the_sign_election_is_pefts_majority_sign_mask():
    """Our one-pass consensus elects and averages as peft's `calculate_majority_sign_mask` ('total'),
    +1 where the weighted deltas sum to exactly 0."""
    from peft.utils.merge_utils import calculate_majority_sign_mask

    g = torch.Generator().manual_seed(8)
    deltas = [torch.randn(2000, generator=g) * (torch.rand(2000, generator=g) > 0.3) for _ in range(3)]
    deltas[0][:5], deltas[1][:5], deltas[2][:5] = 1.0, -1.0, 0.0  # weighted sums of exactly 0 (equal weights below)
    for weights in ([0.2, 0.3, 0.5], [0.5, 0.5, 0.0]):
        weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
        agree = calculate_majority_sign_mask(weighted, method="total")
        denominator = (torch.tensor(weights).view(-1, 1) * agree).sum(0)
        expected = torch.where(denominator > 0, (weighted * agree).sum(0) / denominator.clamp(min=1e-30), 0.0)
        got = kernels.sign_consensus(deltas, torch.tensor(weights))
        torch.testing.assert_close(got, expected)
    assert torch.all(kernels.sign_consensus(deltas, torch.tensor([0.5, 0.5, 0.0]))[:5] == 1.0)  # the +1 election keeps the positive one


@pytest.mark.parametrize("method,density,rng", [("ties", 0.0, None), ("ties", 0.2, None), ("ties", 0.5, None), ("ties", 1.0, None), ("dare", 0.3, "counter"),
                                                ("dare", 0.3, "torch"), ("dare-ties", 0.5, "counter"), ("della", 0.4, "counter"), ("della", 0.4, "torch"),
                                                ("della-exact", 0.4, "counter")])
def test_small_tensors_at_once_equal_tensor_by_tensor(method, density, rng):
    """Issue 19: small tensors go through TIES, DARE, DARE-TIES and DELLA in a few batched passes
    (TIES: one selection per size for all shards and tensors; the random ones: each tensor's draws
    from its own generator); the merged weights are the same, bit for bit, as one tensor at a time."""
    from soup_ui.maths.methods import METHODS, merge_into
    from soup_ui.maths.methods.draws import Draws

    g = torch.Generator().manual_seed(3)
    shapes = {"a": (7, 5), "b": (35,), "c": (16, 4, 3, 3), "d": (1,), "e": (7, 5), "f": (300,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    sources = [{n: t + 0.1 * torch.randn(t.shape, generator=g).round(decimals=1) for n, t in base.items()} for _ in range(3)]
    import dataclasses

    method, ranks = (method.removesuffix("-exact"), {"ranks": "exact"}) if method.endswith("-exact") else (method, {})
    m = METHODS[method]
    params = m.parse({"density": density, "lambda": 1.5, **({"seed": 7, "rng": rng} if m.random else {}), **ranks})
    batched = {n: torch.empty(s) for n, s in shapes.items()}
    calls = []
    spy = dataclasses.replace(m, batch=lambda outs, *rest: calls.append(len(outs)) or m.batch(outs, *rest))
    merge_into(batched, spy, params, sources, [0.2, 0.3, 0.5], base)
    assert calls == [len(shapes)]  # one pass for all six
    for n in shapes:
        one = torch.empty(shapes[n])
        m.fn(one, [s[n] for s in sources], [0.2, 0.3, 0.5], base[n], params, Draws(7, n) if m.random else None)
        assert torch.equal(batched[n], one), n


def test_ties_thresholds_are_kept_across_mixes_and_give_the_same_weights(studio):
    """Issue 19: TIES' thresholds depend on the shard, the base and the density alone: the studio
    keeps them (by shard hash and tensor), so a new weight selects nothing again; the weights are
    the same as when they are computed afresh."""
    calls = []
    real = sparse.small_thresholds  # where TIES' statistics call it
    sparse.small_thresholds = lambda *a: calls.append(len(a[0])) or real(*a)
    try:
        studio.mixer.stats.clear()
        studio.mix(studio.make_mix({"alpha": 1, "beta": 2}, "ties", {"density": 0.4}))
        first = len(calls)
        studio.mix(studio.make_mix({"alpha": 3, "beta": 1}, "ties", {"density": 0.4}))
        assert first > 0 and len(calls) == first  # new weights: no selection
        kept = {n: t.clone() for n, t in studio.hybrid_tensors.items()}
        studio.mixer.stats.clear()
        studio.mixer.mixed = None
        studio.mix(studio.make_mix({"alpha": 3, "beta": 1}, "ties", {"density": 0.4}))
        assert len(calls) > first and all(torch.equal(kept[n], t) for n, t in studio.hybrid_tensors.items())
        studio.mix(studio.make_mix({"alpha": 3, "beta": 1}, "ties", {"density": 0.5}))  # another density: selected again
        assert len(calls) > first + 1
    finally:
        sparse.small_thresholds = real


def test_an_error_in_a_compiled_call_keeps_compiled_kernels_and_a_failed_compile_falls_back(monkeypatch):
    """Issue 33, defect 4: any exception in a compiled kernel call (an out-of-memory, say) turned
    compiled kernels off for the rest of the process. Now only a failed compile does; the call's own
    error is raised as it is."""
    import torch._dynamo.exc

    from soup_ui.maths import soup

    def kernel(x):
        return x + 1

    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def compile_fails(x):
        raise torch._dynamo.exc.TorchRuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "_failed", [])
    monkeypatch.setitem(kernels._compiled, "kernel", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        kernels._run(kernel, torch.zeros(4))
    assert kernels._failed == []
    monkeypatch.setitem(kernels._compiled, "kernel", compile_fails)
    assert torch.equal(kernels._run(kernel, torch.zeros(4)), torch.ones(4))  # eager, the same result
    assert kernels._failed and "no C++ compiler" in kernels._failed[0]
    # the soup kernel: the same rule
    monkeypatch.setattr(soup, "_broken", [])
    monkeypatch.setitem(soup._kernels, "tensors", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        soup._run_compiled("tensors", iter([(torch.zeros(4),)]))
    assert soup._broken == []
