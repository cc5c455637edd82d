"""scripts/bench_ops.py's CPU-checkable parts: the timed fwd+bwd step and the op filter."""


import sys

import pytest
import torch

from tests.scripts import load_script

bench = load_script("bench_ops")


def test_grad_step_differentiates_the_inputs_and_the_layer_parameters(monkeypatch):
    """A layer's fwd+bwd must include its weight gradients (they are GEMMs of the same size as the forward's)."""
    layer = torch.nn.Linear(8, 4)
    seen = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        seen.append([tuple(t.shape) for t in inputs])
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    step = bench.grad_step(layer, (torch.randn(3, 8),), layer.parameters())
    step()
    step()
    assert seen == [[(3, 8), (4, 8), (4,)]] * 2


def test_ops_filter_rejects_an_unknown_name():
    args = bench.argparse.Namespace(ops="no such op", profile=False, heads="", no_layer=True)
    with pytest.raises(ValueError, match="--ops 'no such op' matches none of the ops"):
        bench.run(args, publish=lambda _: None)


def test_layer_arms_are_measured_in_turn_and_summarised_by_their_median():
    calls = []
    times = {"ours": iter([5.0, 4.0, 4.5]), "fla": iter([9.0, 12.0, 10.0])}

    def measure(name):
        calls.append(name)
        if name == "broken":
            raise RuntimeError("no kernel")
        return next(times[name])

    out = bench.interleaved(["ours", "fla", "broken"], 3, measure)
    assert calls == ["ours", "fla", "broken", "ours", "fla", "ours", "fla"]  # in turn; a failed arm once
    assert out == {"ours": [5.0, 4.0, 4.5], "fla": [9.0, 12.0, 10.0], "broken": "error: RuntimeError"}
    assert bench._ms(out["ours"]) == "4.500 ms (4.000-5.000)" and bench._ms([2.0], unit="") == "2.000"
    assert bench._ms(out["broken"]) == "error: RuntimeError"


@pytest.mark.parametrize("flags, match", [(["--heads", "32"], "--heads must be H x d with both >= 1, e.g. 32x128, got '32'"),
                                          (["--heads", "0x128"], "--heads must be H x d with both >= 1, e.g. 32x128, got '0x128'"),
                                          (["--batch", "0"], "--batch must be >= 1, got 0"),
                                          (["--seq-len", "-4"], "--seq-len must be >= 1, got -4")])
def test_profile_step_rejects_bad_shapes(flags, match):
    profile_step = load_script("profile_step")
    with pytest.raises(ValueError, match=match):
        profile_step.parse_args(flags)
    assert profile_step.parse_args(["--heads", "4x256"]).d == 256


def test_host_time_counts_the_calls_and_waits_for_the_sync():
    import time

    calls, synced = [], []
    host, wall = bench.host_time(lambda: calls.append(1), calls=50, sync=lambda: (synced.append(1), time.sleep(0.05)))
    assert len(calls) == 60 and len(synced) == 2  # 10 warm-up calls, then 50 timed
    assert wall - host > 0.04 / 50 * 1e6  # the final sync's 50 ms, spread over the 50 calls


def test_op_cells_give_the_median_its_range_and_the_medians_tflops():
    assert bench.op_cells([2.0, 1.0, 4.0], flops=2e9) == "2.000 (1.000-4.000) | 1.0"
    assert bench.op_cells([0.5], flops=1e12) == "0.500 | 2000.0"
    assert bench.op_cells("error: RuntimeError", flops=1.0) == "error: RuntimeError | -"


@pytest.mark.parametrize("flag", ["--op-rounds", "--layer-rounds"])
def test_rounds_below_one_are_refused(monkeypatch, flag):
    monkeypatch.setattr(bench.sys, "argv", ["bench_ops.py", flag, "0"])
    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        bench.main()


def test_op_table_rows_are_rounds_of_the_ops_in_turn(monkeypatch):
    """`run` on CPU with the timing faked: each shape's ops measured in turn, `--op-rounds` times per mode,
    and each row's cells the median and range of its rounds."""
    order = []

    def fake_bench(fn, inputs, backward, params=()):
        order.append((len(order), backward))
        return 1.0 + len(order) % 3

    monkeypatch.setattr(bench, "bench_one", fake_bench)
    monkeypatch.setattr(bench, "first_call", lambda fn, inputs: order.append((len(order), "first")) or "0.1 s")
    monkeypatch.setattr(bench, "warm_gpu", lambda: None)
    fla_op = lambda *a, **k: (None,)  # noqa: E731  (never called: the timing is faked)
    monkeypatch.setattr(bench, "load_fla", lambda: (dict(gdn=fla_op, delta=fla_op, sgla=fla_op), "0.6.0"))
    monkeypatch.setattr(bench, "forget_fla_tuning", lambda: order.append((len(order), "retune")) or 7)
    real_inputs = bench.make_inputs
    monkeypatch.setattr(bench, "make_inputs", lambda B, T, H, d: real_inputs(B, T, H, d, device="cpu"))
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "fake GPU")
    args = bench.argparse.Namespace(ops="", profile=False, heads="2x16", seq_lens="8,16", tokens=32, part="",
                                    no_layer=True, op_rounds=3, fla_tuning="per-shape")
    text = bench.run(args, publish=lambda _: None)
    rows = [line for line in text.splitlines() if line.startswith("| 4x8 ") or line.startswith("| 2x16 ")]
    assert len(rows) == 2 * 7  # two shapes x (ours: three rules, fla's three, SDPA)
    assert len(order) == 2 * (1 + 7 + 2 * 3 * 7)  # shapes x (fla retuned, a first call per op, modes x rounds x ops)
    # each shape: fla told to tune again, one untimed first call of every op, then each mode's rounds, all ops in turn
    assert [b for _, b in order[:50]] == ["retune"] + ["first"] * 7 + [False] * 21 + [True] * 21
    assert all("(" in row and "-" in row for row in rows) and "median (and range) of 3 rounds" in text
    assert "fla autotuned at each shape" in text
    order.clear()
    args.fla_tuning, args.ops = "first", "ours,fla"
    text = bench.run(args, publish=lambda _: None)
    assert "retune" not in [b for _, b in order] and "first length (`--fla-tuning first`)" in text


def test_first_call_reports_its_seconds_or_the_error(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    x = torch.randn(3, 4)
    assert bench.first_call(lambda t: (t * 2).sum(-1), (x,)).endswith(" s")

    def broken(t):
        raise ValueError("no")

    assert bench.first_call(broken, (x,)) == "error: ValueError"


def test_forget_fla_tuning_reaches_autotuners_under_heuristics(monkeypatch):
    """fla's kernels sit in autotuners, some under a heuristics wrapper: each is found once, drops its
    choices and stops using the disk cache; autotuners outside fla's modules are left alone."""
    import types

    import triton
    import triton.language as tl

    def tuned():
        @triton.jit
        def kernel(x, N: tl.constexpr):
            pass

        return triton.autotune(configs=[triton.Config({}, num_warps=4)], key=["N"], cache_results=True)(kernel)

    inner = tuned()
    wrapped = triton.heuristics({"N": lambda args: 1})(inner)
    outside = tuned()
    for tuner in (inner, outside):
        tuner.cache[(1,)] = "chosen"
    module = types.ModuleType("fla.ops.fake")
    module.kernel, module.alias = wrapped, inner
    monkeypatch.setitem(sys.modules, "fla.ops.fake", module)
    other = types.ModuleType("not_fla")
    other.kernel = outside
    monkeypatch.setitem(sys.modules, "not_fla", other)
    assert bench.forget_fla_tuning() == 1
    assert inner.cache == {} and inner.cache_results is False
    assert outside.cache == {(1,): "chosen"}
