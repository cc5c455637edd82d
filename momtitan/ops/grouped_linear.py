"""`grouped_linear`: one linear map per group of contiguous rows (the per-memory projections).

Rows `[group_ends[g-1], group_ends[g])` are multiplied by `weight[g]`. On CUDA with bf16 this is
`torch._grouped_mm` (one launch for all groups); elsewhere a PyTorch fallback that computes every
group's product for all rows and selects (G times the FLOPs, fixed shapes: fine for CPU runs).

`align > 1` first spreads the rows so that every group starts at a multiple of `align` (zero rows
in between, in a buffer of static size `R + G * (align - 1)` rounded up to a multiple of `align`).
torchao's float8 grouped GEMM (`quantize.grouped_mm.float8`) needs groups of multiples of 16 rows.
"""

from __future__ import annotations

import torch

from momtitan.ops.segments import bucket_of_index


def naive_grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Row by row: the specification."""
    group = bucket_of_index(group_ends, x.shape[0])
    return torch.einsum("ri,roi->ro", x, weight[group])


def aligned_rows(group_ends: torch.Tensor, rows: int, align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(dest [rows], padded_ends [G], capacity)`: row r goes to `dest[r]` when each group is padded to
    a multiple of `align` rows; `padded_ends` are the padded groups' ends; `capacity` the static size,
    itself a multiple of `align` (the float8 backward multiplies the transposed buffer, whose row
    stride is the capacity: 16-byte strides need it)."""
    ends = group_ends.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + align - 1) // align * align
    padded_ends = torch.cumsum(padded, 0)
    group = bucket_of_index(ends, rows)
    dest = (padded_ends - padded)[group] + torch.arange(rows, device=ends.device) - (ends - counts)[group]
    capacity = -(-(rows + ends.numel() * (align - 1)) // align) * align
    return dest, padded_ends, capacity


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, align: int = 1) -> torch.Tensor:
    """`x [R, in]`, `weight [G, out, in]`, `group_ends [G]` int32 (non-decreasing, last = R) -> `[R, out]`."""
    return grouped_linears(x, [weight], group_ends, align)[0]


def grouped_linears(x: torch.Tensor, weights: list[torch.Tensor], group_ends: torch.Tensor, align: int = 1) -> list[torch.Tensor]:
    """`grouped_linear` of the same rows under several weight stacks; with `align > 1` the rows are
    spread once for all of them. Under autocast the GEMMs run in its dtype, as `F.linear` would
    (autocast does not cover `_grouped_mm`: fp32 inputs would take the slow per-group fallback)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
    if align > 1:
        dest, padded_ends, capacity = aligned_rows(group_ends, x.shape[0], align)
        spread = x.new_zeros(capacity, x.shape[1]).index_copy(0, dest, x)
        return [_grouped_mm(spread, w, padded_ends)[dest] for w in weights]
    return [_grouped_mm(x, w, group_ends) for w in weights]


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0:
        # _grouped_mm wants 16-byte strides: rows sliced out of a wider buffer (the expert-parallel
        # receive buffer holds x | q | flag) are copied first
        out = torch._grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=group_ends.to(torch.int32))
        return _ContiguousGrad.apply(out)
    group = bucket_of_index(group_ends, x.shape[0])
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for g in range(weight.shape[0]):
        out = torch.where((group == g)[:, None], x @ weight[g].transpose(0, 1), out)
    return out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: `_grouped_mm`'s backward needs 16-byte
    strides, and a gradient sliced out of a concatenation (k | v | beta | decay, where 2H columns
    need not be a multiple of 8) has the concatenation's row stride."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()
