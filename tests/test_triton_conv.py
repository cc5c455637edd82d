"""Tests of the Triton kernels of `short_conv` (forward, backward) and of its decode step.

CPU: the kernels run under the Triton interpreter at tiny shapes (fp32 and mixed dtypes; one bf16
case with an fp32 weight and cache, bf16 autocast's case; an fp16 step), in ONE subprocess that
runs this file as a script (`python tests/test_triton_conv.py worker`), so the interpreter setting
never reaches the rest of the test session. The worker shrinks the tiles (8 tokens, and at most
2 backward programs per D block) so that small inputs span several T blocks, partial blocks and
the backward's loop over blocks, and prints one JSON line per check. References:
`naive_short_conv` in fp64 (outputs, final states and every gradient), the PyTorch decode step,
and the eager op (for torch.compile).

GPU (`-m gpu`): dtypes (fp32, bf16, fp16) x W (2, 4) x activation, varlen (zero-length segments,
resets) and batched, against `segmented_short_conv` in fp64 (itself checked against the token
loop in tests/ops/test_conv.py); a long many-segment stream; dispatch; torch.compile; the step.
"""

import os
import sys

if __name__ == "__main__":  # the interpreter worker: must be set before triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import json

import pytest
import torch

from tests.interpreter import (
    DTYPES, assert_compiled_matches_eager, compiled_errors, rel_err, result, run_worker, unwritten_reads,
)


def make_inputs(spec, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T, D, W = spec["shape"]
    cu = spec.get("cu")
    N = B if cu is None else len(cu) - 1
    x = torch.randn(B, T, D, generator=gen).to(device, dtype)
    weight = (torch.randn(D, W, generator=gen) * 0.6).to(device, spec.get("wdtype", dtype))
    h0 = torch.randn(N, D, W - 1, generator=gen).to(device, spec.get("h0dtype", dtype)) if spec.get("h0", True) else None
    reset = None
    if spec.get("reset"):
        reset = torch.rand(B, T, generator=gen) < spec["reset"]
    if spec.get("reset_at_starts"):  # a reset on every segment's first token (hides the cache)
        reset = torch.zeros(B, T, dtype=torch.bool) if reset is None else reset
        starts = [c for c in (cu[:-1] if cu is not None else [0]) if c < T]
        reset[:, starts] = True
    extra = dict(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32 if spec.get("cu32") else torch.int64, device=device) if cu is not None else None,
        reset=reset.to(device) if reset is not None else None,
        output_final_state=spec.get("final", True),
        activation=spec.get("act", "silu"),
    )
    return dict(x=x, weight=weight, initial_state=h0), extra


def triton_results(spec, device="cpu", dtype=torch.float32, seed=0):
    """The Triton op's output, final state and every input gradient under random cotangents
    (`{"y", "final_state", "d<input>"}`), and the inputs and cotangents that produced them."""
    from momtitan.ops.triton import triton_short_conv

    x, extra = make_inputs(spec, device, dtype, seed)
    names = [n for n, t in x.items() if t is not None]
    leaves = {n: x[n].detach().clone().requires_grad_(True) for n in names}
    y, final = triton_short_conv(leaves["x"], leaves["weight"], initial_state=leaves.get("initial_state"), **extra)
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=gen).to(device)
    loss = (y.float() * dy).sum()
    dfinal = None
    if final is not None:
        dfinal = torch.randn(final.shape, generator=gen).to(device)
        loss = loss + (final.float() * dfinal).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    out = {"y": y, **({"final_state": final} if final is not None else {}), **{"d" + n: g for n, g in zip(names, grads)}}
    return out, (x, extra, names, dy, dfinal)


def check_case(spec, device="cpu", dtype=torch.float32, seed=0, reference="naive"):
    """Relative errors of the Triton op against the fp64 reference: y, final state, all grads;
    and whether the result dtypes are those of the PyTorch path (y in x's dtype)."""
    from momtitan.ops.conv import naive_short_conv, segmented_short_conv

    out, (x, extra, names, dy, dfinal) = triton_results(spec, device, dtype, seed)
    ref_fn = naive_short_conv if reference == "naive" else segmented_short_conv
    ref = {n: x[n].detach().double().requires_grad_(True) for n in names}
    y2, final2 = ref_fn(ref["x"], ref["weight"], initial_state=ref.get("initial_state"), **extra)
    loss2 = (y2 * dy.double()).sum() + ((final2 * dfinal.double()).sum() if final2 is not None else 0)
    grads2 = torch.autograd.grad(loss2, [ref[n] for n in names])
    refs = {"y": y2, **({"final_state": final2} if "final_state" in out else {}), **{"d" + n: g for n, g in zip(names, grads2)}}
    errs = {k: rel_err(v, refs[k]) for k, v in out.items()}
    finite = all(torch.isfinite(t).all().item() for t in out.values())

    # dtypes as the PyTorch path gives them (it runs on the same inputs, any device): the conv
    # computes in x's dtype, whatever the weight's and the initial state's
    ys, fs = segmented_short_conv(x["x"], x["weight"], initial_state=x["initial_state"], **extra)
    dtypes_ok = out["y"].dtype == x["x"].dtype == ys.dtype and ("final_state" not in out or out["final_state"].dtype == fs.dtype)
    dtypes_ok = dtypes_ok and all(out["d" + n].dtype == x[n].dtype for n in names)
    return errs, finite, dtypes_ok


def check_step(W, act, device="cpu", dtype=torch.float32, state_dtype=torch.float32, compiled=False):
    """The fused step kernel against the PyTorch step in fp64; rows not indexed stay untouched."""
    from momtitan.ops.conv.step import short_conv_step
    from momtitan.ops.triton import triton_short_conv_step

    gen = torch.Generator().manual_seed(3)
    R, S, D = 3, 6, 21
    x, weight = torch.randn(R, D, generator=gen), torch.randn(D, W, generator=gen)
    state = torch.randn(S, D, W - 1, generator=gen).to(state_dtype)
    index = torch.tensor([4, 0, 2])
    st = state.clone().to(device)
    fn = torch.compile(triton_short_conv_step, fullgraph=True) if compiled else triton_short_conv_step
    y = fn(x.to(device, dtype), weight.to(device, dtype), st, index.to(device), act)
    ref_state = state.double()  # the kernel rounds x and weight to the state's dtype, as the PyTorch step does
    y_ref = short_conv_step(x.to(dtype).to(state_dtype).double(), weight.to(dtype).to(state_dtype).double(), ref_state, index, act)
    untouched = [i for i in range(S) if i not in index.tolist()]
    return {
        "y": rel_err(y, y_ref),
        "state": rel_err(st, ref_state),
        "untouched_equal": bool(torch.equal(st.cpu()[untouched], state[untouched])),
        "dtype_ok": y.dtype == dtype and st.dtype == state_dtype,
    }


# relative-error bounds against fp64 on the same (rounded) inputs: (y and final state, gradients)
TOL = {"fp32": (1e-5, 1e-5), "fp16": (2e-3, 3e-3), "bf16": (1e-2, 1.5e-2)}


def _assert_errs(errs, finite, tol_y, tol_g, what):
    assert finite, f"{what}: non-finite output or gradient"
    bad = {k: v for k, v in errs.items() if not v < (tol_y if k in ("y", "final_state") else tol_g)}
    assert not bad, f"{what}: {bad} (all: {errs})"


# ---------------------------------------------------------------- CPU, under the interpreter

CPU_TOL = TOL["fp32"][0]
VARLEN_CU = [0, 0, 1, 1, 4, 13, 13, 30, 30]  # empty segments first, inside and last; T = 30
CPU_CASES = {
    **{
        f"varlen_W{W}_{act or 'none'}": dict(shape=(1, 30, 5, W), cu=VARLEN_CU, reset=0.2, act=act)
        for W in (2, 4) for act in ("silu", None)
    },
    **{
        f"batched_W{W}_{act or 'none'}": dict(shape=(2, 19, 5, W), reset=0.15, act=act)
        for W in (2, 4) for act in ("silu", None)
    },
    "varlen_W3_cu32": dict(shape=(1, 30, 5, 3), cu=VARLEN_CU, cu32=True, reset=0.1),
    "varlen_no_resets": dict(shape=(1, 30, 5, 4), cu=VARLEN_CU),
    "varlen_resets_at_starts": dict(shape=(1, 30, 5, 4), cu=VARLEN_CU, reset=0.1, reset_at_starts=True),
    "varlen_no_state_io": dict(shape=(1, 30, 5, 4), cu=VARLEN_CU, reset=0.2, h0=False, final=False),
    "batched_state_no_final": dict(shape=(2, 11, 6, 4), reset=0.2, final=False),
    "batched_final_no_state": dict(shape=(3, 9, 6, 4), h0=False, act=None),
    "T1": dict(shape=(1, 1, 5, 4)),
    "T1_W2_none": dict(shape=(2, 1, 5, 2), act=None, reset=0.5),
    "T1_varlen_empty_segments": dict(shape=(1, 1, 5, 4), cu=[0, 0, 1, 1]),
    "T2_short_segments": dict(shape=(1, 5, 5, 4), cu=[0, 2, 2, 3, 5], reset=0.3),
    "D_two_blocks": dict(shape=(1, 21, 70, 4), cu=[0, 9, 9, 21], reset=0.1),
    # y and the final state in x's dtype (fp32), dweight and d(initial_state) in fp64
    "weight_and_state_fp64_x_fp32": dict(shape=(1, 17, 5, 4), cu=[0, 5, 17], reset=0.2, wdtype=torch.float64,
                                         h0dtype=torch.float64),
}
# x in bf16 (bf16 autocast's case: fp32 weight and cache; y and the final state bf16, their grads fp32)
CPU_BF16_CASES = {
    "bf16_x_fp32_weight_and_state": dict(shape=(1, 30, 5, 4), cu=VARLEN_CU, reset=0.1, wdtype=torch.float32,
                                         h0dtype=torch.float32),
}


# scratch buffers poisoned with NaN (at the small tiles: partial T blocks, the backward's block loop)
UNWRITTEN_READ_CASES = ["varlen_W4_silu", "batched_W2_none", "varlen_no_state_io", "T1"]
SMALL_TILES = (8, 2)  # (BLOCK_T, BWD_PROGRAMS) for the interpreter


def _emit(check, **fields):
    print(json.dumps({"check": check, **fields}), flush=True)


def _emit_case(name, spec, dtype=torch.float32):
    errs, finite, dtypes_ok = check_case(spec, dtype=dtype)
    _emit(name, errs=errs, finite=finite, dtypes_ok=dtypes_ok)


def _worker():
    import momtitan.ops.triton.conv_kernels as ck

    default_tiles = (ck.BLOCK_T, ck.BWD_PROGRAMS)
    ck.BLOCK_T, ck.BWD_PROGRAMS = SMALL_TILES
    for name, spec in CPU_CASES.items():
        _emit_case(name, spec)
    for name, spec in CPU_BF16_CASES.items():
        _emit_case(name, spec, torch.bfloat16)
    for name in UNWRITTEN_READ_CASES:
        _emit(f"unwritten_{name}", changed=unwritten_reads(triton_results, CPU_CASES[name]))
    ck.BLOCK_T, ck.BWD_PROGRAMS = default_tiles  # one partial T block
    _emit_case("default_tiles", CPU_CASES["varlen_W4_silu"])
    for W in (2, 4):
        for act in ("silu", None):
            _emit(f"step_W{W}_{act or 'none'}", errs=check_step(W, act))
    _emit("step_x_fp16_state_fp32", errs=check_step(4, "silu", dtype=torch.float16))
    ck.BLOCK_T, ck.BWD_PROGRAMS = SMALL_TILES
    _worker_opcheck()
    _worker_compile()


def _worker_opcheck():
    import momtitan.ops.triton  # noqa: F401  (registers the ops)

    fwd, bwd = torch.ops.momtitan.short_conv_fwd, torch.ops.momtitan.short_conv_bwd
    for name in ("varlen_W4_silu", "weight_and_state_fp64_x_fp32"):  # one dtype; mixed (the fakes' dtypes)
        x, extra = make_inputs(CPU_CASES[name], "cpu", torch.float32)
        for t in x.values():
            t.requires_grad_(True)
        cu, reset = extra["cu_seqlens"], extra["reset"]
        torch.library.opcheck(fwd, (x["x"], x["weight"], x["initial_state"], cu, reset, True, True))
        torch.library.opcheck(fwd, (x["x"], x["weight"], x["initial_state"], cu, reset, False, False))
        inputs = [t.detach() for t in (x["x"], x["weight"], x["initial_state"])]
        dy = torch.randn_like(inputs[0])
        dfinal = torch.randn(inputs[2].shape)  # the final state is in x's dtype (fp32)
        torch.library.opcheck(bwd, (dy, dfinal, *inputs, cu, reset, True))
    plain, _ = make_inputs(dict(shape=(2, 9, 4, 2), h0=False), "cpu", torch.float32)
    torch.library.opcheck(fwd, (plain["x"].requires_grad_(True), plain["weight"], None, None, None, True, True))
    torch.library.opcheck(bwd, (torch.randn_like(plain["x"]), None, plain["x"].detach(), plain["weight"], None, None, None, False))
    gen = torch.Generator().manual_seed(5)
    step_args = (torch.randn(2, 7, generator=gen), torch.randn(7, 4, generator=gen), torch.randn(4, 7, 3, generator=gen),
                 torch.tensor([3, 1]), True)
    torch.library.opcheck(torch.ops.momtitan.short_conv_step, step_args)
    _emit("opcheck", ok=True)


def _worker_compile():
    from momtitan.ops.triton import triton_short_conv

    x, extra = make_inputs(CPU_CASES["varlen_W4_silu"], "cpu", torch.float32)
    leaves = {n: t.requires_grad_(True) for n, t in x.items()}

    def f(x, weight, initial_state):
        y, final = triton_short_conv(x, weight, initial_state=initial_state, **extra)
        return (y * y).sum() + final.sum()

    out = compiled_errors(f, leaves, backends=("aot_eager", "inductor"))
    out["step_compiled"] = check_step(4, "silu", compiled=True)["y"]
    _emit("compile", errs=out)


@pytest.fixture(scope="module")
def interpreter_results():
    return run_worker(__file__, timeout=600)


@pytest.mark.parametrize("name", list(CPU_CASES) + ["default_tiles"] + list(CPU_BF16_CASES))
def test_interpreter_matches_naive_fp64(interpreter_results, name):
    r = result(interpreter_results, name)
    assert r["dtypes_ok"], f"{name}: result dtypes differ from the PyTorch path's"
    _assert_errs(r["errs"], r["finite"], *TOL["bf16" if name in CPU_BF16_CASES else "fp32"], name)


@pytest.mark.parametrize("name", [f"step_W{W}_{a}" for W in (2, 4) for a in ("silu", "none")] + ["step_x_fp16_state_fp32"])
def test_interpreter_step(interpreter_results, name):
    r = result(interpreter_results, name)["errs"]
    tol_y = TOL["fp16"][0] if "fp16" in name else CPU_TOL  # y is rounded to x's dtype
    assert r["y"] < tol_y and r["state"] < CPU_TOL and r["untouched_equal"] and r["dtype_ok"], r


@pytest.mark.parametrize("name", UNWRITTEN_READ_CASES)
def test_interpreter_reads_no_unwritten_scratch(interpreter_results, name):
    """The same results, bit for bit, when every buffer the op allocates starts as NaN."""
    assert result(interpreter_results, f"unwritten_{name}")["changed"] == []


def test_interpreter_opcheck(interpreter_results):
    assert result(interpreter_results, "opcheck")["ok"]


def test_interpreter_compile_fullgraph(interpreter_results):
    r = result(interpreter_results, "compile")["errs"]
    assert all(v < CPU_TOL for v in r.values()), r


# ---------------------------------------------------------------- GPU



@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_gpu_reads_no_unwritten_scratch(W):
    """At the GPU's tiles: the same results, bit for bit, when every buffer the op allocates starts as NaN."""
    spec = dict(shape=(1, 600, 64, W), cu=[0, 0, 90, 91, 91, 600, 600], reset=0.05)
    assert unwritten_reads(triton_results, spec, "cuda", torch.bfloat16) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("act", ["silu", None])
def test_gpu_matrix(dtype, W, act):
    tol_y, tol_g = TOL[dtype]
    varlen = dict(shape=(1, 3000, 320, W), cu=[0, 0, 700, 701, 701, 2003, 3000, 3000], reset=0.01, act=act)
    batched = dict(shape=(3, 1000, 200, W), reset=0.01, act=act)
    for what, spec in (("varlen", varlen), ("batched", batched)):
        errs, finite, dtypes_ok = check_case(spec, "cuda", DTYPES[dtype], reference="segmented")
        assert dtypes_ok, what
        _assert_errs(errs, finite, tol_y, tol_g, f"W={W} {act} {dtype} {what}")


@pytest.mark.gpu
def test_gpu_mixed_dtypes_match_pytorch_path():
    """bf16 x with an fp32 weight and cache (bf16 autocast): y and the final state come out bf16 and
    the weight's and cache's gradients fp32, as in PyTorch."""
    spec = dict(shape=(1, 500, 96, 4), cu=[0, 200, 200, 500], reset=0.02, wdtype=torch.float32, h0dtype=torch.float32)
    errs, finite, dtypes_ok = check_case(spec, "cuda", torch.bfloat16, reference="segmented")
    assert dtypes_ok
    _assert_errs(errs, finite, *TOL["bf16"], "mixed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_long_many_segments(dtype):
    """A long stream of many short and empty segments (the backward's loop over T blocks)."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 300, (600,), generator=gen)
    lengths[::7] = 0
    cu = [0] + torch.cumsum(lengths, 0).tolist()
    spec = dict(shape=(1, cu[-1], 512, 4), cu=cu, reset=0.002)
    errs, finite, _ = check_case(spec, "cuda", DTYPES[dtype], reference="segmented")
    _assert_errs(errs, finite, *TOL[dtype], f"long {dtype}")


def test_triton_switch_follows_env():
    import momtitan.ops.triton as tri

    assert tri.DISABLED == (os.environ.get("MOMTITAN_TRITON", "1") == "0")
    assert tri.supports_conv(torch.empty(1)) == (not tri.DISABLED)
    assert not tri.supports_conv(torch.empty(1, dtype=torch.float64))


@pytest.mark.gpu
def test_gpu_dispatch_and_compile_fullgraph(monkeypatch):
    import momtitan.ops.triton as tri
    from momtitan.ops.conv import segmented_short_conv, short_conv
    from momtitan.ops.triton import triton_short_conv

    monkeypatch.setattr(tri, "DISABLED", False)
    spec = dict(shape=(1, 400, 256, 4), cu=[0, 0, 130, 400], reset=0.01)
    x, extra = make_inputs(spec, "cuda", torch.bfloat16)
    leaves = {n: t.requires_grad_(True) for n, t in x.items()}
    y_direct, _ = triton_short_conv(leaves["x"], leaves["weight"], initial_state=leaves["initial_state"], **extra)
    y_public, _ = short_conv(leaves["x"], leaves["weight"], initial_state=leaves["initial_state"], **extra)
    assert torch.equal(y_direct, y_public), "short_conv on CUDA must dispatch to the Triton op"
    monkeypatch.setattr(tri, "DISABLED", True)
    y_off, _ = short_conv(leaves["x"], leaves["weight"], initial_state=leaves["initial_state"], **extra)
    y_pt, _ = segmented_short_conv(leaves["x"], leaves["weight"], initial_state=leaves["initial_state"], **extra)
    assert torch.equal(y_off, y_pt), "with Triton disabled short_conv must take the PyTorch path"
    monkeypatch.setattr(tri, "DISABLED", False)

    def f(x, weight, initial_state):
        y, final = short_conv(x, weight, initial_state=initial_state, **extra)
        return y.float().square().sum() + final.float().sum()

    assert_compiled_matches_eager(f, leaves)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("W", [2, 4])
def test_gpu_step(dtype, W):
    # the state keeps the dtype of the inputs (ModelCache's conv state has the model's dtype)
    r = check_step(W, "silu", "cuda", DTYPES[dtype], state_dtype=DTYPES[dtype])
    tol = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}[dtype]
    assert r["y"] < tol and r["state"] < 1e-6 and r["untouched_equal"] and r["dtype_ok"], r


@pytest.mark.gpu
def test_gpu_step_compiled_and_dispatch(monkeypatch):
    import momtitan.ops.triton as tri
    from momtitan.ops.conv import short_conv_step

    monkeypatch.setattr(tri, "DISABLED", False)
    r = check_step(4, "silu", "cuda", torch.float32, compiled=True)
    assert r["y"] < 1e-5 and r["state"] < 1e-6 and r["untouched_equal"], r
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 96, generator=gen).cuda(), torch.randn(96, 4, generator=gen).cuda()
    state = torch.randn(5, 96, 3, generator=gen).cuda()
    cpu_state = state.cpu().double()
    y = short_conv_step(x, weight, state, torch.tensor([1, 3]).cuda())
    y_ref = short_conv_step(x.cpu().double(), weight.cpu().double(), cpu_state, torch.tensor([1, 3]))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(state, cpu_state) < 1e-6


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()
