"""The soup maths, exactly."""

import math
import threading
import weakref
from collections.abc import Mapping

import pytest
import torch

from soup_ui.maths import soup
from soup_ui.maths.soup import FlatTensors, average_into, flatten_module, normalize_weights


def tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g).to(dtype), "b.bias": torch.randn(5, generator=g).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_one_zero_gives_first_source_bit_for_bit(dtype):
    target, s1, s2 = tensors(0, dtype), tensors(1, dtype), tensors(2, dtype)
    average_into(target, [s1, s2], [1.0, 0.0])
    for k in target:
        assert torch.equal(target[k], s1[k])


def test_equal_weights_give_the_mean():
    target, sources = tensors(0), [tensors(i) for i in (1, 2, 3)]
    average_into(target, sources, [2.0, 2.0, 2.0])
    for k in target:
        expected = (sources[0][k] + sources[1][k] + sources[2][k]) / 3
        torch.testing.assert_close(target[k], expected, rtol=0, atol=1e-6)


def test_weights_are_normalized():
    target, s1, s2 = tensors(0), tensors(1), tensors(2)
    average_into(target, [s1, s2], [3.0, 1.0])
    for k in target:
        torch.testing.assert_close(target[k], 0.75 * s1[k] + 0.25 * s2[k], rtol=0, atol=1e-6)
    assert normalize_weights([3, 1]) == [0.75, 0.25]


def test_in_place_and_nothing_left_over_from_the_previous_mix():
    target, s1, s2 = tensors(0), tensors(1), tensors(2)
    storage = {k: v.data_ptr() for k, v in target.items()}
    average_into(target, [s1, s2], [0.9, 0.1])
    average_into(target, [s1, s2], [0.0, 1.0])
    for k in target:
        assert target[k].data_ptr() == storage[k]
        assert torch.equal(target[k], s2[k])


def test_module_parameters_are_a_valid_target():
    net, a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    average_into(dict(net.named_parameters()), [a.state_dict(), b.state_dict()], [1, 1])
    torch.testing.assert_close(net.weight.data, (a.weight.data + b.weight.data) / 2)


def test_fp16_target_is_accumulated_in_fp32():
    target = {"x": torch.zeros(1000, dtype=torch.float16)}
    sources = [{"x": torch.full((1000,), 1.0 + i / 1024, dtype=torch.float16)} for i in range(7)]
    average_into(target, sources, [1] * 7)
    exact = sum(1.0 + i / 1024 for i in range(7)) / 7
    assert torch.all(target["x"] == torch.tensor(exact, dtype=torch.float16))


@pytest.mark.parametrize(
    "weights, message",
    [
        ([], "no shard selected"),
        ([0.0, 0.0], "sum to zero"),
        ([1.0, -0.5], "must be between 0 and 100, got -0.5"),
        ([1.0, math.nan], "must be finite"),
        ([math.inf, 1.0], "must be finite"),
    ],
)
def test_bad_weights_raise_and_change_nothing(weights, message):
    target, sources = tensors(0), [tensors(1), tensors(2)][: len(weights)]
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(ValueError, match=message):
        average_into(target, sources, weights)
    for k in target:
        assert torch.equal(target[k], before[k])


def test_mismatched_shapes_name_the_tensor_and_change_nothing():
    target, good, bad = tensors(0), tensors(1), tensors(2)
    bad["b.bias"] = torch.zeros(6)
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(ValueError, match=r"'b.bias' has shape \(6,\), target has \(5,\)"):
        average_into(target, [good, bad], [1, 1])
    assert all(torch.equal(target[k], before[k]) for k in target)


def test_missing_tensor_is_named():
    target, s = tensors(0), tensors(1)
    del s["a.weight"]
    with pytest.raises(ValueError, match="no tensor 'a.weight'"):
        average_into(target, [s], [1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensors_larger_than_a_block(dtype):
    from soup_ui.maths import soup

    n = soup.CPU_BLOCK * 2 + 12345  # three blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    sources = [{"w": torch.randn(n, generator=g).to(dtype)} for _ in range(3)]
    target = {"w": torch.empty(n, dtype=dtype)}
    average_into(target, sources, [0.5, 0.25, 0.25])
    expected = (0.5 * sources[0]["w"].double() + 0.25 * sources[1]["w"].double() + 0.25 * sources[2]["w"].double()).to(dtype)
    assert (target["w"].double() - expected.double()).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-3)


def test_integer_buffers_are_taken_from_the_first_source():
    target = {"n": torch.zeros(3, dtype=torch.int64)}
    average_into(target, [{"n": torch.tensor([1, 2, 3])}, {"n": torch.tensor([7, 8, 9])}], [1, 1])
    assert target["n"].tolist() == [1, 2, 3]


def require_compiled():
    """Fused-vs-eager comparisons mean nothing if compiling failed (both sides would be eager)."""
    if soup._broken:
        pytest.skip(f"the soup kernel cannot be compiled here: {soup._broken[0]}")


def test_fused_kernel_matches_the_eager_path():
    """The compiled path gives the same soup as the eager one."""
    sources = [tensors(i, torch.float16) for i in (1, 2, 3)]
    eager, fused = tensors(0, torch.float16), tensors(0, torch.float16)
    average_into(eager, sources, [0.2, 0.3, 0.5], fused=False)
    average_into(fused, sources, [0.2, 0.3, 0.5], fused=True)
    require_compiled()
    assert soup.compiled_ready("tensors", 3, torch.float16, "cpu")  # the compiled kernel ran
    for k in eager:
        assert torch.equal(eager[k], fused[k])
    average_into(fused, sources, [0.0, 1.0, 0.0], fused=True)
    assert all(torch.equal(fused[k], sources[1][k]) for k in fused)


def test_task_arithmetic_runs_as_one_weighted_sum_over_state_dicts():
    from soup_ui.maths.methods import merge_into, method

    ta = method("task-arithmetic")
    base, s1, s2 = tensors(0), tensors(1), tensors(2)
    target = tensors(9)
    merge_into(target, ta, ta.parse({"lambda": 2.0}), [s1, s2], [0.5, 0.5], base)
    for k in target:
        expected = base[k] + 2.0 * (0.5 * (s1[k] - base[k]) + 0.5 * (s2[k] - base[k]))
        torch.testing.assert_close(target[k], expected, rtol=0, atol=1e-5)
    merge_into(target, ta, ta.parse({"lambda": 1.0}), [s1, s2], [0.25, 0.75], base)  # lambda 1 = the average
    for k in target:
        torch.testing.assert_close(target[k], 0.25 * s1[k] + 0.75 * s2[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="task-arithmetic needs the base weights"):
        merge_into(target, ta, ta.parse({}), [s1], [1.0])

def test_weight_distance_is_the_rms_of_the_difference():
    from soup_ui.maths.soup import weight_distance

    s1, s2 = tensors(1), tensors(2)
    diff = torch.cat([(s1[k].double() - s2[k].double()).flatten() for k in s1])
    assert weight_distance([s1, s2], [1.0, -1.0]) == pytest.approx(diff.square().mean().sqrt().item(), rel=1e-6)  # summed in float32


def big_tensors(seed, dtype=torch.float16):
    """Tensors that span several CPU blocks, so a flat buffer crosses block and tensor boundaries together."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (300, 200, 3), "norm.bias": (7,), "proj.weight": (513, 600)}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def test_flat_buffers_give_the_per_tensor_result_bit_for_bit():
    sources = [big_tensors(i) for i in (1, 2, 3)]
    per_tensor, flat = big_tensors(0), FlatTensors.pack(big_tensors(0))
    average_into(per_tensor, sources, [0.2, 0.3, 0.5], fused=False)
    average_into(flat, [FlatTensors.pack(s) for s in sources], [0.2, 0.3, 0.5], fused=False)
    assert flat.buffer.numel() == sum(t.numel() for t in per_tensor.values())
    for k in per_tensor:
        assert torch.equal(flat[k], per_tensor[k]), k


def test_flat_buffers_through_the_range_kernel(monkeypatch):
    """A flat buffer goes through the compiled kernel in calls of at most RANGE_MAX elements; the seams do not show."""
    monkeypatch.setattr(soup, "RANGE_MAX", 1 << 16)  # 7 whole pieces and a shorter one
    sources = [FlatTensors.pack(big_tensors(i)) for i in (1, 2, 3)]
    eager, fused = FlatTensors.pack(big_tensors(0)), FlatTensors.pack(big_tensors(0))
    average_into(eager, sources, [0.2, 0.3, 0.5], fused=False)
    average_into(fused, sources, [0.2, 0.3, 0.5], fused=True)
    require_compiled()
    assert soup.compiled_ready("range", 3, torch.float16, "cpu")  # the compiled kernel ran
    torch.testing.assert_close(fused.buffer, eager.buffer, rtol=1e-3, atol=1e-3)  # fused multiply-adds may round differently
    average_into(fused, sources, [0.0, 1.0, 0.0], fused=True)
    assert torch.equal(fused.buffer, sources[1].buffer)


def test_flat_target_with_plain_sources_uses_the_views():
    sources = [big_tensors(i) for i in (1, 2)]
    flat = FlatTensors.pack(big_tensors(0))
    average_into(flat, [sources[0], FlatTensors.pack(sources[1])], [1.0, 0.0])
    assert all(torch.equal(flat[k], sources[0][k]) for k in flat)


def test_flat_source_sharing_the_target_buffer_is_refused():
    flat = FlatTensors.pack(big_tensors(0))
    before = flat.buffer.clone()
    with pytest.raises(ValueError, match="shares memory"):
        average_into(flat, [flat, FlatTensors.pack(big_tensors(1))], [0.5, 0.5])
    assert torch.equal(flat.buffer, before)


def test_flatten_module_keeps_the_module_working_and_mixes_into_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    x = torch.randn(3, 6)
    before = net(x)
    flat = flatten_module(net)
    assert isinstance(flat, FlatTensors) and flat.buffer.numel() == sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    average_into(flat, [flatten_module(other)], [1.0])  # the module now computes `other`
    torch.testing.assert_close(net(x), other(x), rtol=0, atol=0)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(net.parameters(), other.parameters()))


def test_flatten_module_leaves_mixed_dtypes_alone():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))  # num_batches_tracked is int64
    tensors = flatten_module(net)
    assert not isinstance(tensors, FlatTensors) and set(tensors) == set(net.state_dict())


class ReadCounter(Mapping):
    """A source read tensor by tensor (like lean mode's LazyWeights) that records how many of its reads are alive."""

    def __init__(self, tensors):
        self.tensors, self.alive, self.most_alive = tensors, weakref.WeakSet(), 0

    def __getitem__(self, name):
        tensor = self.tensors[name].clone()
        self.alive.add(tensor)
        self.most_alive = max(self.most_alive, len(self.alive))
        return tensor

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


@pytest.mark.parametrize("fused", [False, True])
def test_lazy_sources_are_read_a_tensor_at_a_time(fused):
    many = {f"t{i}": torch.randn(50) for i in range(12)}
    sources = [ReadCounter({k: v + i for k, v in many.items()}) for i in range(2)]
    target = {k: torch.empty(50) for k in many}
    average_into(target, sources, [0.5, 0.5], fused=fused)
    for k in many:
        torch.testing.assert_close(target[k], many[k] + 0.5)
    assert all(s.most_alive <= 3 for s in sources), [s.most_alive for s in sources]  # a few of 12, never all


def test_an_interactive_mix_never_compiles(monkeypatch):
    """Issue 12, item 14: a mix whose kernel is not compiled yet runs eager at once and compiles the
    kernel in the background; the next mix of that K uses it."""
    monkeypatch.setattr(soup, "WARM_UP_MIN", 1 << 14)  # a buffer this size counts as SD-sized
    sources = [FlatTensors.pack(big_tensors(i, torch.float32)) for i in (1, 2, 3, 4, 5)]
    target = FlatTensors.pack(big_tensors(0, torch.float32))
    variant = ("range", 5, torch.float32, "cpu")
    soup._ready.discard(variant)
    soup._warming.pop(variant, None)
    calls = []
    real = soup._run_compiled
    monkeypatch.setattr(soup, "_run_compiled", lambda kind, it: calls.append(threading.current_thread().name) or real(kind, it))
    average_into(target, sources, [1, 1, 1, 1, 1])  # fused=None: the interactive default
    assert all(name.startswith("soup-compile") for name in calls)  # compiled only in the background
    soup._warming[variant].join(timeout=300)
    require_compiled()
    assert soup.compiled_ready(*variant)
    calls.clear()
    average_into(target, sources, [1, 2, 3, 4, 5])
    assert calls == [threading.current_thread().name]  # now the compiled kernel serves it


def test_weighted_sum_takes_negative_coefficients_and_rounds_once():
    from soup_ui.maths.soup import weighted_sum_into

    base, s1 = tensors(0, torch.float16), tensors(1, torch.float16)
    target = tensors(9, torch.float16)
    weighted_sum_into(target, [s1, base], [3.0, -2.0])
    for k in target:
        assert torch.equal(target[k], (3.0 * s1[k].double() - 2.0 * base[k].double()).to(torch.float16))


class NoFloat64(torch.Tensor):
    """Tensors that refuse float64 maths, as on Apple's MPS."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(a is torch.float64 for a in args) or kwargs.get("dtype") is torch.float64:
            raise TypeError("MPS does not support float64")
        return super().__torch_function__(func, types, args, kwargs)


def test_weight_distance_runs_without_float64():
    """Item 19: leave-one-out's weight distance must run where float64 does not exist."""
    from soup_ui.maths.soup import weight_distance

    s1 = {k: v.as_subclass(NoFloat64) for k, v in tensors(1).items()}
    s2 = {k: v.as_subclass(NoFloat64) for k, v in tensors(2).items()}
    assert weight_distance([s1, s2], [1.0, -1.0]) > 0


def test_a_render_never_overlaps_a_background_compile(studio, monkeypatch):
    """Compiling traces with torch.fx, which patches nn.Module.__call__ for the whole process: a UNet
    running meanwhile in another thread died with "NameError: module is not installed as a
    submodule" (seen on an SD-1.5-sized base, whose kernel compiles in the background after loading).
    Renders and compiles now exclude each other."""
    import threading
    import time

    from soup_ui.maths import soup as soup_module
    from soup_ui.modelfiles.presets import RenderSettings

    tracing = threading.Event()

    class Slow(torch.nn.Module):
        def forward(self, x):
            tracing.set()
            time.sleep(1.5)  # while this is traced, every module call in the process goes through fx
            return x + 1

    def fake_compile(kind, calls):
        torch.fx.symbolic_trace(Slow())
        return True

    monkeypatch.setattr(soup_module, "_run_compiled", fake_compile)
    monkeypatch.setattr(soup_module, "_ready", set())
    threads = soup_module.warm_up([1], torch.float64, "cpu")
    assert threads and tracing.wait(30)
    image = studio.render_soup(studio.make_mix({"alpha": 1, "beta": 1}), RenderSettings(prompt="a cat", steps=2, height=16, width=16, seed=12345)).image
    assert image.size == (16, 16)
    threads[0].join()


def test_a_kernel_call_of_a_new_shape_is_traced_under_the_lock(monkeypatch):
    """Issue 33, defect 4: only the first call of a merge held soup.TRACING; later tensors of another
    rank (lean mode streams them one by one) recompiled outside it, while a render in another thread
    may run a model. A call of a shape the kernel has not seen now holds the lock; a seen one does not."""
    held = []

    def kernel(out, sources, weights):
        held.append((out.dim(), soup.TRACING._is_owned()))
        out.copy_(sources[0])

    monkeypatch.setattr(soup, "_kernel", lambda kind: kernel)
    monkeypatch.setattr(soup, "_traced", set())
    w = torch.ones(1)
    calls = [(torch.zeros(4), [torch.ones(4)], w), (torch.zeros(3, 3), [torch.ones(3, 3)], w), (torch.zeros(5), [torch.ones(5)], w),
             (torch.zeros(2, 2, 3, 3), [torch.ones(2, 2, 3, 3)], w), (torch.zeros(4, 4), [torch.ones(4, 4)], w)]
    assert soup._run_compiled("tensors", iter(calls))
    assert held == [(1, True), (2, True), (1, False), (4, True), (2, False)]
