import torch

from momtitan.ops.grouped_linear import grouped_linear, naive_grouped_linear
from tests.conftest import assert_close


def test_grouped_linear_with_empty_groups_and_grads():
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    ends = torch.tensor([2, 2, 9, 11], dtype=torch.int32)  # group 1 is empty
    dy = torch.randn(11, 3, dtype=torch.float64)
    y = grouped_linear(x, w, ends)
    ref = naive_grouped_linear(x, w, ends)
    assert_close("y", y, ref, 1e-12)
    ga = torch.autograd.grad((y * dy).sum(), (x, w))
    gb = torch.autograd.grad((ref * dy).sum(), (x, w))
    assert_close("dx", ga[0], gb[0], 1e-12)
    assert_close("dw", ga[1], gb[1], 1e-12)
    assert torch.count_nonzero(ga[1][1]) == 0  # the empty group gets no gradient


def test_aligned_groups_give_the_same_rows_and_grads():
    """Groups padded to multiples of `align` (float8 grouped GEMMs need 16) change nothing."""
    from momtitan.ops.grouped_linear import aligned_rows

    ends = torch.tensor([0, 5, 5, 21, 40], dtype=torch.int32)  # empty first and third groups
    dest, padded_ends, capacity = aligned_rows(ends, 40, 16)
    assert padded_ends.tolist() == [0, 16, 16, 32, 64] and capacity == 128  # 40 + 5 * 15 = 115, rounded up to a multiple of 16
    assert dest.unique().numel() == 40 and int(dest.max()) < capacity
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(40, 3, dtype=torch.float64)
    for align in (4, 16):
        y = grouped_linear(x, w, ends, align)
        ref = naive_grouped_linear(x, w, ends)
        assert_close(f"y align {align}", y, ref, 1e-12)
        ga = torch.autograd.grad((y * dy).sum(), (x, w))
        gb = torch.autograd.grad((ref * dy).sum(), (x, w))
        assert_close("dx", ga[0], gb[0], 1e-12)
        assert_close("dw", ga[1], gb[1], 1e-12)


def test_autocast_runs_the_grouped_gemm_in_its_dtype_and_grads_reach_fp32_weights():
    """Under autocast (what torchtitan uses on one GPU, without FSDP) the GEMMs take autocast's dtype,
    as F.linear does, and the gradients come back to the fp32 inputs."""
    x = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    ends = torch.tensor([10, 10, 30], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, ends)
    assert y.dtype == torch.bfloat16
    assert_close("y", y.float(), naive_grouped_linear(x, w, ends), 2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
