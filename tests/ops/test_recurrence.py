"""The chunked linear recurrence and the decode step against the token-loop reference, in fp64."""

import pytest
import torch

from momtitan.config import RULE_INPUTS
from momtitan.ops import linear_recurrence, linear_recurrence_step
from momtitan.ops.recurrence import chunk_linear_recurrence, naive_linear_recurrence
from tests.conftest import assert_close

RULES = RULE_INPUTS  # rule -> (has g, has beta)


def make_inputs(B, T, H, K, V, rule, dtype=torch.float64, N=None):
    use_g, use_beta = RULES[rule]
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, dtype=dtype)) if use_g else None
    beta = torch.rand(B, T, H, dtype=dtype) if use_beta else None
    h0 = torch.randn(N or B, H, K, V, dtype=dtype)
    return q, k, v, g, beta, h0


def run_both(q, k, v, g, beta, h0, chunk_size, **kw):
    leaves = [t for t in (q, k, v, g, beta, h0) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    do, dfinal = torch.randn_like(v), torch.randn_like(h0)  # random cotangents for o and the final state
    results = []
    for fn in (naive_linear_recurrence, lambda *a, **k2: chunk_linear_recurrence(*a, chunk_size=chunk_size, **k2)):
        o, final = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
        grads = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), leaves)
        results.append((o, final, grads))
    return results, [n for n, t in zip("q k v g beta h0".split(), (q, k, v, g, beta, h0)) if t is not None]


def check(results, names, tol=1e-10):
    (o_ref, f_ref, g_ref), (o, f, gr) = results
    assert_close("o", o, o_ref, tol)
    assert_close("final_state", f, f_ref, tol)
    for name, a, b in zip(names, gr, g_ref):
        assert_close(f"d{name}", a, b, tol)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 4), (13, 8), (16, 4)])
def test_batched_matches_reference(rule, T, chunk):
    inputs = make_inputs(2, T, 2, 5, 3, rule)
    check(*run_both(*inputs, chunk, qk_l2norm=True))


@pytest.mark.parametrize("rule", list(RULES))
def test_varlen_with_empty_segments_and_resets(rule):
    cu = torch.tensor([0, 0, 5, 5, 6, 17, 17, 30])
    inputs = make_inputs(1, 30, 2, 4, 6, rule, N=7)
    reset = torch.rand(1, 30) < 0.2
    reset[0, 5] = True  # a reset on a segment's first token discards its initial state
    check(*run_both(*inputs, 4, cu_seqlens=cu, reset=reset, qk_l2norm=True))


@pytest.mark.parametrize("rule", ["gated_delta", "linear"])
def test_without_l2norm_and_custom_scale(rule):
    q, k, v, g, beta, h0 = make_inputs(1, 11, 1, 4, 4, rule)
    k = k * 0.3  # keep the un-normalised delta rule contractive
    check(*run_both(q, k, v, g, beta, h0, 4, scale=0.7))


def test_fp32_inputs_stay_close_to_fp64_reference():
    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 16, 16, "gated_delta")
    ref, ref_final = naive_linear_recurrence(q, k, v, g, beta, initial_state=h0, output_final_state=True, qk_l2norm=True)
    f32 = [t.float() if t is not None else None for t in (q, k, v, g, beta, h0)]
    o, final = linear_recurrence(*f32[:5], initial_state=f32[5], output_final_state=True, qk_l2norm=True)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert_close("o", o, ref, 1e-5)
    assert_close("final_state", final, ref_final, 1e-5)


def test_public_function_defaults_and_no_final_state():
    q, k, v, g, beta, _ = make_inputs(1, 9, 2, 4, 4, "gated")
    o, final = linear_recurrence(q, k, v, g)
    ref, _ = naive_linear_recurrence(q, k, v, g)
    assert final is None
    assert_close("o", o, ref, 1e-12)


@pytest.mark.parametrize("rule", list(RULES))
def test_step_updates_only_indexed_states(rule):
    R, S, H, K, V = 3, 6, 2, 4, 5
    q, k, v, g, beta, _ = make_inputs(1, R, H, K, V, rule)
    table = torch.randn(S, H, K, V, dtype=torch.float64)
    index = torch.tensor([4, 0, 2])
    before = table.clone()
    o = linear_recurrence_step(q[0], k[0], v[0], None if g is None else g[0], None if beta is None else beta[0],
                               table, index, qk_l2norm=True)
    for r, s in enumerate(index.tolist()):
        one = lambda t: None if t is None else t[:, r : r + 1]
        ref, final = naive_linear_recurrence(one(q), one(k), one(v), one(g), one(beta), initial_state=before[s : s + 1],
                                             output_final_state=True, qk_l2norm=True)
        assert_close("o", o[r], ref[0, 0], 1e-12)
        assert_close("state", table[s], final[0], 1e-12)
    untouched = [s for s in range(S) if s not in index.tolist()]
    assert torch.equal(table[untouched], before[untouched])


def test_bad_step_and_recurrence_arguments_are_named():
    R, S, H, K, V = 2, 4, 2, 8, 6
    q, k, v = torch.randn(R, H, K), torch.randn(R, H, K), torch.randn(R, H, V)
    state, index = torch.zeros(S, H, K, V), torch.tensor([3, 1])
    with pytest.raises(ValueError, match=r"state must be \[S, H, K, V\] with H, K, V = 2, 8, 6, got \(4, 2, 6, 8\)"):
        linear_recurrence_step(q, k, v, None, None, torch.zeros(S, H, V, K), index)
    with pytest.raises(ValueError, match=r"index must be an int32/int64 \[R = 2\] tensor, got torch.int64 \(3,\)"):
        linear_recurrence_step(q, k, v, None, None, state, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"beta must be \[R, H\] = \(2, 2\) or None, got torch.Size\(\[2\]\)"):
        linear_recurrence_step(q, k, v, None, torch.rand(2), state, index)
    with pytest.raises(ValueError, match=r"k must be \[R, H, K\] = \(2, 2, 8\)"):
        linear_recurrence_step(q, k[:1], v, None, None, state, index)
    with pytest.raises(ValueError, match=r"scale must be a float or None, got True"):
        linear_recurrence_step(q, k, v, None, None, state, index, scale=True)
    x = torch.randn(1, 5, H, K)
    with pytest.raises(ValueError, match=r"the head dims K and V must be >= 1, got q \(1, 5, 2, 0\)"):
        linear_recurrence(x[..., :0], x[..., :0], x)
    with pytest.raises(ValueError, match=r"cu_seqlens must hold N\+1 >= 2 offsets, got 1"):
        linear_recurrence(x, x, x, cu_seqlens=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"scale must be a float or None, got True"):
        linear_recurrence(x, x, x, scale=True)
    with pytest.raises(ValueError, match=r"v must be on q's device meta, got cpu"):  # meta: a second device anywhere
        linear_recurrence(x.to("meta"), x.to("meta"), x)
    with pytest.raises(ValueError, match=r"index must be on state's device meta, got cpu"):
        linear_recurrence_step(q.to("meta"), k.to("meta"), v.to("meta"), None, None, state.to("meta"), index)
