"""The segmented short conv and its decode step against the token-loop reference, in fp64."""

import pytest
import torch

from momtitan.ops.conv import naive_short_conv, segmented_short_conv, short_conv, short_conv_step
from tests.conftest import assert_close


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_varlen_conv_matches_reference_with_grads(W, with_state, with_reset):
    D = 5
    cu = torch.tensor([0, 1, 1, 4, 12, 12, 25])  # short, empty and long segments
    x = torch.randn(1, 25, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(D, W, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(6, D, W - 1, dtype=torch.float64, requires_grad=True) if with_state else None
    reset = (torch.rand(1, 25) < 0.25) if with_reset else None
    leaves = [t for t in (x, weight, h0) if t is not None]
    dy, dfinal = torch.randn(1, 25, D, dtype=torch.float64), torch.randn(6, D, W - 1, dtype=torch.float64)
    outs = []
    for fn in (naive_short_conv, segmented_short_conv):
        y, final = fn(x, weight, cu_seqlens=cu, reset=reset, initial_state=h0, output_final_state=True)
        grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), leaves)
        outs.append((y, final, grads))
    (y0, f0, g0), (y1, f1, g1) = outs
    assert_close("y", y1, y0, 1e-12)
    assert_close("final_state", f1, f0, 1e-12)
    for name, a, b in zip(["x", "weight", "initial_state"], g1, g0):
        assert_close(f"d{name}", a, b, 1e-12)


def test_batched_conv_matches_reference():
    x, weight = torch.randn(3, 9, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y, _ = short_conv(x, weight)
    ref, _ = naive_short_conv(x, weight)
    assert_close("y", y, ref, 1e-12)


def test_step_matches_reference_and_touches_only_indexed_rows():
    D, W = 4, 4
    table = torch.randn(5, D, W - 1, dtype=torch.float64)
    before = table.clone()
    x, weight = torch.randn(2, D, dtype=torch.float64), torch.randn(D, W, dtype=torch.float64)
    index = torch.tensor([3, 1])
    y = short_conv_step(x, weight, table, index)
    for r, s in enumerate(index.tolist()):
        ref, final = naive_short_conv(x[r][None, None], weight, initial_state=before[s : s + 1], output_final_state=True)
        assert_close("y", y[r], ref[0, 0], 1e-12)
        assert_close("state", table[s], final[0], 1e-12)
    assert torch.equal(table[[0, 2, 4]], before[[0, 2, 4]])


def test_output_keeps_the_input_dtype_with_fp32_weights():
    """bf16 activations with fp32 weights (bf16 autocast on one GPU): the conv stays in bf16 and the
    weight's gradient comes back in fp32."""
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16)
    weight = torch.randn(6, 4, requires_grad=True)
    y, _ = short_conv(x, weight)
    assert y.dtype == torch.bfloat16
    ref, _ = naive_short_conv(x.double(), weight.double())
    assert torch.allclose(y.double(), ref, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32


@pytest.mark.parametrize("cu", [None, [0, 0, 0]])
def test_empty_stream_hands_back_the_initial_window(cu):
    """No token at all: every segment's final window is its initial one (zeros without one), as the
    token-by-token reference says; the PyTorch path used to index the empty stream."""
    w = torch.randn(4, 3, dtype=torch.float64)
    B = 2 if cu is None else 1
    h0 = torch.randn(2, 4, 2, dtype=torch.float64)
    cu = None if cu is None else torch.tensor(cu)
    x = torch.randn(B, 0, 4, dtype=torch.float64)
    for initial in (h0, None):
        y, final = short_conv(x, w, cu_seqlens=cu, initial_state=initial, output_final_state=True)
        _, ref = naive_short_conv(x, w, cu_seqlens=cu, initial_state=initial, output_final_state=True)
        assert y.shape == (B, 0, 4)
        assert torch.equal(final, ref) and torch.equal(final, h0 if initial is not None else torch.zeros_like(h0))


def test_bad_conv_and_step_arguments_are_named():
    x, w = torch.randn(1, 5, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight must have W >= 1 taps, got shape \(4, 0\)"):
        short_conv(x, torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        short_conv(x.long(), w)
    with pytest.raises(ValueError, match=r"reset must be a torch.Tensor or None, got list"):
        short_conv(x, w, reset=[False] * 5)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a \[N\+1\] tensor with N >= 1, got shape \(1,\)"):
        short_conv(x, w, cu_seqlens=torch.tensor([0]))
    state, index = torch.zeros(3, 4, 2), torch.tensor([2, 0])
    with pytest.raises(ValueError, match=r"state must be \[S, D, W-1\] with D, W-1 = 4, 2, got \(3, 4, 3\)"):
        short_conv_step(torch.randn(2, 4), w, torch.zeros(3, 4, 3), index)
    with pytest.raises(ValueError, match=r"index must be an int32/int64 \[R = 2\] tensor, got torch.float32 \(2,\)"):
        short_conv_step(torch.randn(2, 4), w, state, index.float())
    with pytest.raises(ValueError, match=r"weight must be \[D = 4, W >= 1\], got \(5, 3\)"):
        short_conv_step(torch.randn(2, 4), torch.randn(5, 3), state, index)
    with pytest.raises(ValueError, match=r"activation must be 'silu' or None, got 'relu'"):
        short_conv_step(torch.randn(2, 4), w, state, index, activation="relu")
    with pytest.raises(ValueError, match=r"weight must be on x's device meta, got cpu"):
        short_conv(x.to("meta"), w)
