"""Tests of the Triton kernels of `linear_recurrence` (forward and backward) and of the decode step.

CPU: the kernels run under the Triton interpreter at tiny shapes, in fp32, in ONE subprocess that
runs this file as a script (`python tests/test_triton_recurrence.py worker`), so the interpreter
setting never reaches the rest of the test session. The worker prints one JSON line per check;
the tests below assert on them. References: `naive_linear_recurrence` in fp64 (outputs, final
states and every gradient), the PyTorch decode step, and the eager op (for torch.compile).

GPU (`-m gpu`): the full matrix rules x head dims (64, 128, 256) x dtypes (fp32, bf16, fp16), each
with a varlen call (zero-length segments, awkward lengths) and a batched call (T not a multiple
of the chunk), plus long sequences, torch.compile(fullgraph=True), dispatch and the decode step.
"""

import os
import sys

if __name__ == "__main__":  # the interpreter worker: must be set before triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import json

import pytest
import torch

from momtitan.config import RULE_INPUTS
from tests.interpreter import (
    DTYPES, assert_compiled_matches_eager, compiled_errors, rel_err, result, run_worker, unwritten_reads,
)

RULES = RULE_INPUTS  # rule -> (has g, has beta)


def make_inputs(spec, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = spec["shape"]
    has_g, has_beta = RULES[spec["rule"]]
    cu = spec.get("cu")
    N = B if cu is None else len(cu) - 1

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    x = dict(
        q=rnd(B, T, H, K).to(device, dtype),
        k=rnd(B, T, H, K).to(device, dtype),
        v=rnd(B, T, H, V).to(device, dtype),
        g=(-torch.rand(B, T, H, generator=gen) * spec.get("decay", 0.7)).to(device) if has_g else None,
        beta=torch.rand(B, T, H, generator=gen).to(device, dtype) if has_beta else None,
        initial_state=(0.5 * rnd(N, H, K, V)).to(device) if spec.get("h0", True) else None,
    )
    extra = dict(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32 if spec.get("cu32") else torch.int64, device=device) if cu is not None else None,
        reset=(torch.rand(B, T, generator=gen) < spec["reset"]).to(device) if spec.get("reset") else None,
        qk_l2norm=spec.get("l2", True),
        output_final_state=spec.get("final", True),
    )
    if not extra["qk_l2norm"]:  # keep the un-normalised recurrences tame
        x["q"], x["k"] = x["q"] * 0.3, x["k"] * 0.3
    return x, extra


def triton_results(spec, device="cpu", dtype=torch.float32, seed=0):
    """The Triton op's output, final state and every input gradient under random cotangents
    (`{"o", "final_state", "d<input>"}`), and the inputs and cotangents that produced them."""
    from momtitan.ops.triton import triton_linear_recurrence

    x, extra = make_inputs(spec, device, dtype, seed)
    names = [n for n, t in x.items() if t is not None]
    leaves = {n: x[n].detach().clone().requires_grad_(True) for n in names}
    o, ht = triton_linear_recurrence(**{n: leaves.get(n) for n in x}, **extra, chunk_size=spec.get("C", 64))
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen).to(device)
    loss = (o.float() * do).sum()
    dht = None
    if ht is not None:
        dht = torch.randn(ht.shape, generator=gen).to(device)
        loss = loss + (ht * dht).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    out = {"o": o, **({"final_state": ht} if ht is not None else {}), **{"d" + n: g for n, g in zip(names, grads)}}
    return out, (x, extra, names, do, dht)


def check_case(spec, device="cpu", dtype=torch.float32, seed=0):
    """Relative errors of the Triton op against the fp64 token loop: o, final state, all grads."""
    from momtitan.ops.recurrence.naive import naive_linear_recurrence

    out, (x, extra, names, do, dht) = triton_results(spec, device, dtype, seed)
    ref_leaves = {n: x[n].detach().double().requires_grad_(True) for n in names}
    o2, ht2 = naive_linear_recurrence(**{n: ref_leaves.get(n) for n in x}, **extra)
    loss2 = (o2 * do.double()).sum() + ((ht2 * dht.double()).sum() if ht2 is not None else 0)
    grads2 = torch.autograd.grad(loss2, [ref_leaves[n] for n in names], allow_unused=True)
    refs = {"o": o2, **({"final_state": ht2} if "final_state" in out else {}), **{"d" + n: g for n, g in zip(names, grads2)}}
    errs = {k: rel_err(v, torch.zeros_like(v) if refs[k] is None else refs[k]) for k, v in out.items()}
    finite = all(torch.isfinite(t).all().item() for t in out.values())
    return errs, finite


def _permuted(x):
    """`x [R, H, D]` as a dense view with the heads outermost in memory (strides of a [H, R, D] tensor)."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def check_step(rule, device="cpu", dtype=torch.float32, l2=True, compiled=False, permuted=False):
    """The fused step kernel against the PyTorch step, on CPU copies; rows not indexed untouched.
    `permuted`: q, k, v as dense views whose row order in memory is not [R, H, D]'s."""
    from momtitan.ops.recurrence.step import linear_recurrence_step
    from momtitan.ops.triton import triton_linear_recurrence_step

    gen = torch.Generator().manual_seed(3)
    R, S, H, K, V = 3, 6, 2, 16, 24
    has_g, has_beta = RULES[rule]
    q, k = torch.randn(R, H, K, generator=gen), torch.randn(R, H, K, generator=gen)
    v = torch.randn(R, H, V, generator=gen)
    g = -torch.rand(R, H, generator=gen) if has_g else None
    beta = torch.rand(R, H, generator=gen) if has_beta else None
    state = torch.randn(S, H, K, V, generator=gen) * 0.5
    index = torch.tensor([4, 0, 2])
    dev = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    st = state.clone().to(device)
    fn = triton_linear_recurrence_step
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    layout = _permuted if permuted else (lambda t: t)
    o = fn(layout(dev(q)), layout(dev(k)), layout(dev(v)), dev(g), dev(beta), st, index.to(device), qk_l2norm=l2)
    ref_state = state.clone()
    cast = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    ref_state64 = ref_state.double()
    o_ref = linear_recurrence_step(cast(q), cast(k), cast(v), cast(g), cast(beta), ref_state64, index, qk_l2norm=l2)
    untouched = [i for i in range(S) if i not in index.tolist()]
    return {
        "o": rel_err(o.cpu(), o_ref),
        "state": rel_err(st.cpu(), ref_state64),
        "untouched_equal": bool(torch.equal(st.cpu()[untouched], state[untouched])),
    }


# ---------------------------------------------------------------- CPU, under the interpreter

CPU_TOL = 1e-5
CPU_CASES = {
    **{f"{r}_batched": dict(rule=r, shape=(2, 37, 2, 16, 8), C=16, reset=0.1, l2=r in ("delta", "gated_delta")) for r in RULES},
    **{f"{r}_varlen_zero": dict(rule=r, shape=(1, 40, 2, 8, 16), C=16, cu=[0, 0, 5, 5, 23, 40, 40], reset=0.08) for r in RULES},
    "gated_delta_T1": dict(rule="gated_delta", shape=(1, 1, 1, 16, 16), C=16),
    "gated_delta_T16_exact": dict(rule="gated_delta", shape=(1, 16, 1, 16, 16), C=16, cu=[0, 16], cu32=True),
    "gated_delta_no_state_io": dict(rule="gated_delta", shape=(1, 21, 2, 16, 16), C=16, h0=False, final=False),
    "gated_delta_blocks": dict(rule="gated_delta", shape=(1, 24, 1, 80, 72), C=16, reset=0.1),
    "gated_blocks": dict(rule="gated", shape=(1, 24, 1, 80, 72), C=16, l2=False),
    # the sequential passes' four K blocks (head dims 129-256), the last one partly past K
    "gated_delta_four_k_blocks": dict(rule="gated_delta", shape=(1, 20, 1, 200, 24), C=16, cu=[0, 0, 7, 20], reset=0.1),
    "gated_delta_chunk64": dict(rule="gated_delta", shape=(1, 70, 1, 16, 16), C=64, reset=0.03),
    # the inverse kernel's 16-row blocks: two per chunk at C = 32, four at C = 64 (varlen, empty segments)
    "delta_chunk32": dict(rule="delta", shape=(1, 45, 1, 16, 16), C=32, reset=0.05),
    "gated_delta_varlen_chunk64": dict(rule="gated_delta", shape=(1, 90, 1, 16, 16), C=64, cu=[0, 0, 17, 17, 80, 90]),
    "delta_strong_decay_resets": dict(rule="gated_delta", shape=(1, 36, 1, 16, 16), C=16, decay=6.0, reset=0.3),
}

# fp16 under the interpreter (which computes fp16 right, bf16 not): the 16-bit paths (T and the chunk
# states in the inputs' dtype, 128-wide chunk tiles, 16-bit dots, dq / dk stored in fp16 without the
# L2 norm), against the fp64 loop of the fp16-rounded inputs with the GPU's fp16 bounds
FP16_CASES = {
    "gated_delta_fp16_wide": dict(rule="gated_delta", shape=(1, 45, 1, 40, 128), cu=[0, 0, 20, 45], reset=0.05),
    "gated_fp16_no_l2": dict(rule="gated", shape=(2, 21, 1, 40, 128), l2=False),
}

# scratch buffers poisoned with NaN: varlen with empty segments and partial chunks, every rule, and
# the sequential passes' K blocks partly past K
UNWRITTEN_READ_CASES = [f"{r}_varlen_zero" for r in RULES] + ["gated_delta_four_k_blocks"]


def _worker():
    torch.manual_seed(0)
    for name, spec in CPU_CASES.items():
        errs, finite = check_case(spec)
        print(json.dumps({"check": name, "errs": errs, "finite": finite}), flush=True)
    for name, spec in FP16_CASES.items():
        errs, finite = check_case(spec, dtype=torch.float16)
        print(json.dumps({"check": name, "errs": errs, "finite": finite}), flush=True)
    for rule in RULES:
        print(json.dumps({"check": f"step_{rule}", "errs": check_step(rule)}), flush=True)
    print(json.dumps({"check": "step_linear_no_l2", "errs": check_step("linear", l2=False)}), flush=True)
    print(json.dumps({"check": "step_permuted", "errs": check_step("gated_delta", permuted=True)}), flush=True)
    for name in UNWRITTEN_READ_CASES:
        print(json.dumps({"check": f"unwritten_{name}", "changed": unwritten_reads(triton_results, CPU_CASES[name])}), flush=True)
    _worker_opcheck()
    _worker_compile()
    _worker_sac()
    _worker_kept()
    _worker_split_seq_tiles()
    _worker_state_k_split()
    _worker_tile_order()


def _worker_opcheck():
    import momtitan.ops.triton  # noqa: F401  (registers the ops)

    x, extra = make_inputs(CPU_CASES["gated_delta_varlen_zero"], "cpu", torch.float32)
    for n in ("q", "k", "v", "g", "beta", "initial_state"):
        x[n].requires_grad_(True)
    fwd_args = (x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"], extra["cu_seqlens"], extra["reset"], 0.3, True, 16)
    torch.library.opcheck(torch.ops.momtitan.linear_recurrence_fwd, fwd_args)
    # dense but permuted q, k, v ([B, H, T, D] memory order): the fakes must give the real outputs' strides
    permuted = [x[n].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for n in ("q", "k", "v")]
    torch.library.opcheck(torch.ops.momtitan.linear_recurrence_fwd, (*permuted, *fwd_args[3:]))
    plain = make_inputs(dict(rule="linear", shape=(2, 9, 1, 16, 16), h0=False), "cpu", torch.float32)[0]
    torch.library.opcheck(
        torch.ops.momtitan.linear_recurrence_fwd,
        (plain["q"].requires_grad_(True), plain["k"], plain["v"], None, None, None, None, None, 0.25, False, 16),
    )
    det = [t.detach() if isinstance(t, torch.Tensor) else t for t in fwd_args]
    kept = torch.ops.momtitan.linear_recurrence_fwd(*det)[2:]  # T, rq, rk: what the backward op reads
    bwd_args = (torch.randn_like(x["v"]), torch.randn(6, 2, 8, 16), *det, *kept)
    torch.library.opcheck(torch.ops.momtitan.linear_recurrence_bwd, bwd_args)
    torch.library.opcheck(torch.ops.momtitan.linear_recurrence_bwd, (torch.randn_like(plain["v"]), None, *[
        t.detach() if isinstance(t, torch.Tensor) else t
        for t in (plain["q"], plain["k"], plain["v"], None, None, None, None, None, 0.25, False, 16, None, None, None)
    ]))
    gen = torch.Generator().manual_seed(5)
    step_args = (
        torch.randn(2, 1, 16, generator=gen), torch.randn(2, 1, 16, generator=gen), torch.randn(2, 1, 16, generator=gen),
        -torch.rand(2, 1, generator=gen), torch.rand(2, 1, generator=gen), torch.randn(4, 1, 16, 16, generator=gen),
        torch.tensor([3, 1]), 0.25, True,
    )
    torch.library.opcheck(torch.ops.momtitan.linear_recurrence_step, step_args)
    torch.library.opcheck(torch.ops.momtitan.linear_recurrence_step,
                          (*(_permuted(t) for t in step_args[:3]), *step_args[3:]))
    print(json.dumps({"check": "opcheck", "ok": True}), flush=True)


def _worker_compile():
    from momtitan.ops.triton import triton_linear_recurrence

    spec = CPU_CASES["gated_delta_varlen_zero"]
    x, extra = make_inputs(spec, "cpu", torch.float32)
    leaves = {n: t.requires_grad_(True) for n, t in x.items()}

    def f(q, k, v, g, beta, initial_state):
        o, ht = triton_linear_recurrence(q, k, v, g, beta, initial_state=initial_state, **extra, chunk_size=16)
        return (o * o).sum() + ht.sum()

    out = compiled_errors(f, leaves, backends=("aot_eager", "inductor"))
    out["step_compiled"] = check_step("gated_delta", compiled=True)["o"]
    print(json.dumps({"check": "compile", "errs": out}), flush=True)


def _worker_sac():
    """Per-op selective checkpointing with the training recipes' save list: the backward's recompute
    takes the recurrence's output from the forward instead of running the op again."""
    import functools

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from momtitan.ops.triton import triton_linear_recurrence
    from momtitan.parallel.parallelize import SAC_SAVE_OPS

    fwd = torch.ops.momtitan.linear_recurrence_fwd.default

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is fwd
            return func(*args, **(kwargs or {}))

    def policy(save, ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    spec = CPU_CASES["gated_delta_batched"]
    x, extra = make_inputs(spec, "cpu", torch.float32)
    leaves = {n: t.requires_grad_(True) for n, t in x.items()}

    def f(q, k, v, g, beta, initial_state):
        o, ht = triton_linear_recurrence(torch.sin(q), k, v, g, beta, initial_state=initial_state, **extra, chunk_size=16)
        return torch.cos(o).sum() + ht.sum()

    def checkpointed(save, **inputs):
        context = functools.partial(create_selective_checkpoint_contexts, functools.partial(policy, save))
        return checkpoint(f, **inputs, use_reentrant=False, context_fn=context)

    calls = {}
    for name, save in (("saved", SAC_SAVE_OPS), ("recomputed", set())):
        Count.calls = 0
        with Count():
            torch.autograd.grad(checkpointed(save, **leaves), list(leaves.values()))
        calls[name] = Count.calls
    # and compiled, as the recipes train: the compiler applies the same policy inside its graph
    eager = f(**leaves)
    expected = torch.autograd.grad(eager, list(leaves.values()))
    torch._dynamo.reset()
    value = torch.compile(functools.partial(checkpointed, SAC_SAVE_OPS), fullgraph=True, backend="aot_eager")(**leaves)
    grads = torch.autograd.grad(value, list(leaves.values()))
    compiled_err = max([rel_err(value, eager)] + [rel_err(a, b) for a, b in zip(grads, expected)])
    print(json.dumps({"check": "sac", "calls": calls, "compiled_err": compiled_err}), flush=True)


def _worker_kept():
    """Launches of the inverse kernel and of the row-norm kernel in one forward+backward: the backward
    reads the forward's T and norms instead of computing them again."""
    from momtitan.ops.triton import launch

    calls = {"inverse": 0, "norms": 0}

    class CountedKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls["inverse"] += 1
            return self.kernel[grid]

    def counted_norms(x):
        calls["norms"] += 1
        return norms(x)

    inverse, norms = launch.inverse_kernel, launch.reciprocal_norms
    launch.inverse_kernel, launch.reciprocal_norms = CountedKernel(inverse), counted_norms
    try:
        triton_results(CPU_CASES["gated_delta_batched"])
    finally:
        launch.inverse_kernel, launch.reciprocal_norms = inverse, norms
    print(json.dumps({"check": "kept", "calls": calls}), flush=True)


# the sequential passes at different V tiles (c_end's row stored as wide as the wider one)
SPLIT_SEQ_TILES = ({"BVS": 16, "BVS_bwd": 32}, {"BVS": 32, "BVS_bwd": 16})


def _worker_split_seq_tiles():
    from momtitan.ops.triton import launch

    spec = dict(rule="gated_delta", shape=(1, 37, 2, 16, 32), C=16, cu=[0, 0, 20, 37], reset=0.1)
    for tiles in SPLIT_SEQ_TILES:
        launch.OVERRIDES.update(tiles)
        try:
            errs, finite = check_case(spec)
        finally:
            launch.OVERRIDES.clear()
        print(json.dumps({"check": f"split_{tiles['BVS']}_{tiles['BVS_bwd']}", "errs": errs, "finite": finite}),
              flush=True)


# the state passes split along K (`state_k_split` 1: both, 2: the reverse pass only): two and four K
# blocks (the last partly past K), varlen with an empty segment and resets; the delta rules hold every
# row whatever the choice
K_SPLIT_CASES = {
    "gated": (dict(rule="gated", shape=(1, 24, 2, 80, 72), C=16, cu=[0, 0, 9, 24], reset=0.1, l2=False), 2),
    "linear": (dict(rule="linear", shape=(1, 20, 1, 200, 24), C=16, cu=[0, 0, 7, 20], reset=0.1), 4),
    "gated_delta": (dict(rule="gated_delta", shape=(1, 24, 1, 80, 24), C=16, reset=0.1), 1),
}


def _worker_state_k_split():
    for prefix, split in (("k_split", 1), ("k_split_bwd", 2)):
        _state_pass_comparison(prefix, {case: (spec, {"state_k_split": 0}, {"state_k_split": split})
                                        for case, (spec, _) in K_SPLIT_CASES.items()})


def _state_pass_comparison(prefix: str, cases: dict) -> None:
    """Per case `name: (spec, first, second)`, two runs under the tile overrides `first` and `second`:
    the errors against the fp64 loop under `second`, the results that differ bit for bit, and the grids
    of the state passes' launches in each run."""
    from momtitan.ops.triton import launch

    grids = {"state_kernel": [], "state_bwd_kernel": []}

    class RecordedKernel:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(launch, name)

        def __getitem__(self, grid):
            grids[self.name].append(list(grid))
            return self.kernel[grid]

    kernels = {name: getattr(launch, name) for name in grids}
    for name in grids:
        setattr(launch, name, RecordedKernel(name))
    try:
        for case, (spec, first, second) in cases.items():
            runs = []
            for overrides in (first, second):
                launch.OVERRIDES.update(overrides)
                try:
                    for launches in grids.values():
                        launches.clear()
                    runs.append((triton_results(spec)[0], {k: list(v) for k, v in grids.items()}))
                finally:
                    launch.OVERRIDES.clear()
            launch.OVERRIDES.update(second)
            try:
                errs, finite = check_case(spec)
            finally:
                launch.OVERRIDES.clear()
            (a, a_grids), (b, b_grids) = runs
            changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
            print(json.dumps({"check": f"{prefix}_{case}", "errs": errs, "finite": finite, "changed": changed,
                              "grids": [a_grids, b_grids]}), flush=True)
    finally:
        for name, kernel in kernels.items():
            setattr(launch, name, kernel)


# the state passes' tiles of one (segment, head) on an axis of their own instead of side by side
# (`state_tiles_side_by_side` 0): two V tiles each way, varlen with an empty segment and resets, and
# (simple GLA) two K splits per V tile as well
TILE_ORDER_CASES = {
    "gated_delta": (dict(rule="gated_delta", shape=(1, 37, 2, 16, 32), C=16, cu=[0, 0, 20, 37], reset=0.1),
                    {"BVS": 16, "BVS_bwd": 16}),
    "gated_split": (dict(rule="gated", shape=(1, 24, 2, 80, 40), C=16, cu=[0, 0, 9, 24], reset=0.1, l2=False),
                    {"BVS": 32, "BVS_bwd": 32, "state_k_split": 1}),
}


def _worker_tile_order():
    _state_pass_comparison("tile_order", {
        case: (spec, {**tiles, "state_tiles_side_by_side": 1}, {**tiles, "state_tiles_side_by_side": 0})
        for case, (spec, tiles) in TILE_ORDER_CASES.items()})


@pytest.fixture(scope="module")
def interpreter_results():
    return run_worker(__file__, timeout=900)


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreter_matches_naive_fp64(interpreter_results, name):
    r = result(interpreter_results, name)
    assert r["finite"], r
    bad = {k: v for k, v in r["errs"].items() if not v < CPU_TOL}
    assert not bad, f"{name}: relative errors above {CPU_TOL}: {bad} (all: {r['errs']})"


@pytest.mark.parametrize("name", list(FP16_CASES))
def test_interpreter_fp16_matches_naive_fp64(interpreter_results, name):
    r = result(interpreter_results, name)
    _assert_errs(r["errs"], r["finite"], *GPU_TOL["fp16"], name)


@pytest.mark.parametrize("name", [f"step_{r}" for r in RULES] + ["step_linear_no_l2", "step_permuted"])
def test_interpreter_step(interpreter_results, name):
    r = result(interpreter_results, name)["errs"]
    assert r["o"] < CPU_TOL and r["state"] < CPU_TOL and r["untouched_equal"], r


@pytest.mark.parametrize("name", UNWRITTEN_READ_CASES)
def test_interpreter_reads_no_unwritten_scratch(interpreter_results, name):
    """The same results, bit for bit, when every buffer the op allocates starts as NaN."""
    assert result(interpreter_results, f"unwritten_{name}")["changed"] == []


def test_interpreter_opcheck(interpreter_results):
    assert result(interpreter_results, "opcheck")["ok"]


def test_per_op_sac_keeps_the_recurrence_output(interpreter_results):
    """`linear_recurrence_fwd` is in `SAC_SAVE_OPS`: one forward per step under per-op SAC, not two;
    compiled with the policy, the gradients stay the eager ones."""
    r = result(interpreter_results, "sac")
    assert r["calls"] == {"saved": 1, "recomputed": 2}, r
    assert r["compiled_err"] < CPU_TOL, r


def test_backward_keeps_the_forwards_inverse_and_norms(interpreter_results):
    """One inverse launch and one norm launch each for q and k per forward+backward (the gradients
    from the kept tensors are checked against the fp64 loop by the cases above)."""
    assert result(interpreter_results, "kept")["calls"] == {"inverse": 1, "norms": 2}


def test_backward_op_requires_the_kept_tensors():
    """The backward op reads the forward's T and norms: called without them it says which is missing."""
    from momtitan.ops.triton import recurrence_op  # noqa: F401  (registers the ops)

    x, extra = make_inputs(CPU_CASES["gated_delta_batched"], "cpu", torch.float32)
    args = (torch.randn_like(x["v"]), None, x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"], None,
            None, 0.25, True, 16)
    with pytest.raises(ValueError, match="T exactly when beta"):
        torch.ops.momtitan.linear_recurrence_bwd(*args, None, None, None)
    T = torch.zeros(6, 2, 16, 16)
    with pytest.raises(ValueError, match="takes the forward's rq and rk"):
        torch.ops.momtitan.linear_recurrence_bwd(*args, T, None, None)


@pytest.mark.parametrize("tiles", SPLIT_SEQ_TILES, ids=lambda t: f"{t['BVS']}_{t['BVS_bwd']}")
def test_interpreter_sequential_passes_at_their_own_tiles(interpreter_results, tiles):
    r = result(interpreter_results, f"split_{tiles['BVS']}_{tiles['BVS_bwd']}")
    _assert_errs(r["errs"], r["finite"], CPU_TOL, CPU_TOL, str(tiles))


@pytest.mark.parametrize("passes", ["both", "reverse"])
@pytest.mark.parametrize("name", list(K_SPLIT_CASES))
def test_interpreter_state_passes_split_along_k(interpreter_results, name, passes):
    """`state_k_split`: the rules without beta run the state passes in NKB programs per V tile (1: every
    launch, the forward's, the backward's recompute and the reverse pass; 2: the reverse pass only), with
    the unsplit passes' results bit for bit; the delta rules keep one."""
    r = result(interpreter_results, f"k_split_{name}" if passes == "both" else f"k_split_bwd_{name}")
    _assert_errs(r["errs"], r["finite"], CPU_TOL, CPU_TOL, name)
    assert r["changed"] == [], r
    whole, split = r["grids"]  # the tiles side by side on axis 0 (the CPU's default)
    factor = K_SPLIT_CASES[name][1]
    assert len(whole["state_kernel"]) == 2 and len(whole["state_bwd_kernel"]) == 1, r  # the backward's recompute
    factors = {"state_kernel": factor if passes == "both" else 1, "state_bwd_kernel": factor}
    assert all([g[0] for g in split[k]] == [factors[k] * g[0] for g in whole[k]] for k in whole), r


@pytest.mark.parametrize("name", list(TILE_ORDER_CASES))
def test_interpreter_state_tiles_on_their_own_axis(interpreter_results, name):
    """`state_tiles_side_by_side` 0: the state passes launch (segments, heads, tiles) instead of
    (segments x tiles, heads), with the side-by-side results bit for bit."""
    r = result(interpreter_results, f"tile_order_{name}")
    _assert_errs(r["errs"], r["finite"], CPU_TOL, CPU_TOL, name)
    assert r["changed"] == [], r
    side, own = ([*g["state_kernel"], *g["state_bwd_kernel"]] for g in r["grids"])
    assert len(side) == len(own) == 3, r  # the forward's pass, the backward's recompute, the reverse pass
    for (n_tiles, heads), (n, heads_own, tiles) in zip(side, own):
        assert heads == heads_own and n_tiles == n * tiles and tiles > 1, r


def test_interpreter_compile_fullgraph(interpreter_results):
    r = result(interpreter_results, "compile")["errs"]
    assert all(v < CPU_TOL for v in r.values()), r


# ---------------------------------------------------------------- GPU

# relative-error bounds against fp64 (outputs and final states, gradients)
GPU_TOL = {"fp32": (1e-4, 1e-4), "fp16": (5e-3, 1e-2), "bf16": (2e-2, 4e-2)}


def _assert_errs(errs, finite, tol_o, tol_g, what):
    assert finite, f"{what}: non-finite output or gradient"
    bad = {k: v for k, v in errs.items() if not v < (tol_o if k in ("o", "final_state") else tol_g)}
    assert not bad, f"{what}: {bad} (all: {errs})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("rule", list(RULES))
def test_gpu_matrix(rule, d, dtype):
    """Every rule, head dim and dtype against the fp64 loop."""
    tol_o, tol_g = GPU_TOL[dtype]
    varlen = dict(rule=rule, shape=(1, 200, 2, d, d), cu=[0, 0, 70, 71, 71, 200], reset=0.02)
    batched = dict(rule=rule, shape=(2, 100, 2, d, d), reset=0.02)
    for what, spec in (("varlen", varlen), ("batched", batched)):
        errs, finite = check_case(spec, "cuda", DTYPES[dtype])
        _assert_errs(errs, finite, tol_o, tol_g, f"{rule} d={d} {dtype} {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("rule", [r for r, (_, delta) in RULES.items() if not delta])
@pytest.mark.parametrize("split", [1, 2])
def test_gpu_state_passes_split_along_k(rule, d, dtype, split, monkeypatch):
    """`state_k_split` forced, both passes or the reverse pass only (by default only where the state
    programs are few), against the fp64 loop."""
    from momtitan.ops.triton import launch

    monkeypatch.setattr(launch, "OVERRIDES", {"state_k_split": split})
    spec = dict(rule=rule, shape=(1, 200, 2, d, d), cu=[0, 0, 70, 71, 71, 200], reset=0.02)
    errs, finite = check_case(spec, "cuda", DTYPES[dtype])
    _assert_errs(errs, finite, *GPU_TOL[dtype], f"{rule} d={d} {dtype} split along K")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("rule", list(RULES))
def test_gpu_tiles_of_many_programs(rule, d, dtype, monkeypatch):
    """These tests' shapes have few state programs, so their forward state pass runs narrowed (down to 16
    wide, `_Plan._narrowed_for_few_programs`) and the passes split along K: here the choices of a shape of
    many programs (a GPU of 0 SMs to the plan), against the fp64 loop."""
    from momtitan.ops.triton import launch

    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 0)
    spec = dict(rule=rule, shape=(1, 200, 2, d, d), cu=[0, 0, 70, 71, 71, 200], reset=0.02)
    errs, finite = check_case(spec, "cuda", DTYPES[dtype])
    _assert_errs(errs, finite, *GPU_TOL[dtype], f"{rule} d={d} {dtype} tiles of many programs")


@pytest.mark.gpu
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("d", [64, 256])
def test_gpu_reads_no_unwritten_scratch(rule, d):
    """At the GPU's tiles (chunk 64, up to four K blocks): the same results, bit for bit, when every
    buffer the op allocates starts as NaN."""
    spec = dict(rule=rule, shape=(1, 200, 2, d, d), cu=[0, 0, 70, 71, 71, 200], reset=0.02)
    assert unwritten_reads(triton_results, spec, "cuda", torch.bfloat16) == []


@pytest.mark.gpu
@pytest.mark.parametrize("rule", list(RULES))
def test_gpu_no_l2norm_small_dims(rule):
    spec = dict(rule=rule, shape=(1, 90, 3, 32, 48), cu=[0, 33, 33, 90], l2=False, reset=0.05)
    errs, finite = check_case(spec, "cuda", torch.float32)
    _assert_errs(errs, finite, 1e-4, 1e-4, f"{rule} no-l2")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_long_sequences_vs_chunk_fp64(dtype):
    """Many chunks per segment: compare with the chunked PyTorch path in fp64."""
    from momtitan.ops.recurrence.chunk import chunk_linear_recurrence
    from momtitan.ops.triton import triton_linear_recurrence

    spec = dict(rule="gated_delta", shape=(1, 5000, 4, 128, 128), cu=[0, 1000, 1000, 4100, 5000], reset=0.001)
    x, extra = make_inputs(spec, "cuda", DTYPES[dtype])
    names = list(x)
    leaves = {n: x[n].detach().clone().requires_grad_(True) for n in names}
    o, ht = triton_linear_recurrence(**leaves, **extra)
    do = torch.randn_like(o, dtype=torch.float32)
    grads = torch.autograd.grad((o.float() * do).sum() + ht.sum(), list(leaves.values()))
    ref = {n: x[n].detach().double().requires_grad_(True) for n in names}
    o2, ht2 = chunk_linear_recurrence(**ref, **extra)
    grads2 = torch.autograd.grad((o2 * do.double()).sum() + ht2.sum(), list(ref.values()))
    errs = {"o": rel_err(o, o2), "final_state": rel_err(ht, ht2)}
    errs.update({"d" + n: rel_err(a, b) for n, a, b in zip(names, grads, grads2)})
    tol_o, tol_g = GPU_TOL[dtype]
    _assert_errs(errs, True, tol_o, tol_g, f"long {dtype}")


def test_triton_switch_follows_env():
    import momtitan.ops.triton as tri

    assert tri.DISABLED == (os.environ.get("MOMTITAN_TRITON", "1") == "0")  # on unless MOMTITAN_TRITON=0


@pytest.mark.gpu
def test_gpu_dispatch_and_compile_fullgraph(monkeypatch):
    import momtitan.ops.triton as tri
    from momtitan.ops.recurrence import linear_recurrence
    from momtitan.ops.triton import triton_linear_recurrence

    monkeypatch.setattr(tri, "DISABLED", False)  # the dispatch under test, whatever MOMTITAN_TRITON says

    spec = dict(rule="gated_delta", shape=(1, 300, 4, 128, 128), cu=[0, 0, 130, 300], reset=0.01)
    x, extra = make_inputs(spec, "cuda", torch.bfloat16)
    leaves = {n: t.requires_grad_(True) for n, t in x.items()}
    o_direct, _ = triton_linear_recurrence(**leaves, **extra)
    o_public, _ = linear_recurrence(**leaves, **extra)
    assert torch.equal(o_direct, o_public), "linear_recurrence on CUDA must dispatch to the Triton op"

    def f(q, k, v, g, beta, initial_state):
        o, ht = linear_recurrence(q, k, v, g, beta, initial_state=initial_state, **extra)
        return o.float().square().sum() + ht.sum()

    assert_compiled_matches_eager(f, leaves)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rule", list(RULES))
def test_gpu_step(rule, dtype):
    r = check_step(rule, "cuda", DTYPES[dtype])
    # inputs are rounded to dtype first (the reference sees the same values); the kernel computes
    # and keeps the fp32 state in fp32, and rounds only the output to dtype
    tol_o = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}[dtype]
    assert r["o"] < tol_o and r["state"] < 1e-5 and r["untouched_equal"], r


@pytest.mark.gpu
def test_gpu_step_compiled_and_dispatch():
    from momtitan.ops.recurrence.step import linear_recurrence_step

    r = check_step("gated_delta", "cuda", torch.float32, compiled=True)
    assert r["o"] < 1e-5 and r["state"] < 1e-5 and r["untouched_equal"], r
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, generator=gen).cuda() for _ in range(3))
    g, beta = -torch.rand(2, 2).cuda(), torch.rand(2, 2).cuda()
    state = torch.randn(5, 2, 64, 64, generator=gen).cuda()
    cpu_state = state.cpu().double()
    o = linear_recurrence_step(q, k, v, g, beta, state, torch.tensor([1, 3]).cuda(), qk_l2norm=True)
    o_ref = linear_recurrence_step(*(t.cpu().double() for t in (q, k, v, g, beta)), cpu_state, torch.tensor([1, 3]), qk_l2norm=True)
    assert rel_err(o.cpu(), o_ref) < 1e-5 and rel_err(state.cpu(), cpu_state) < 1e-5


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()
