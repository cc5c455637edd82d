"""scripts/bench_ops.py's CPU-checkable parts: the timed fwd+bwd step and the op filter."""


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
