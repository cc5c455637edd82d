"""`grouped_linear`: one linear map per group of contiguous rows (the per-memory projections).

Rows `[group_ends[g-1], group_ends[g])` are multiplied by `weight[g]`. On CUDA with bf16 this is
`torch._grouped_mm` (one launch for all groups); elsewhere a PyTorch fallback that computes every
group's product for all rows and selects (G times the FLOPs, fixed shapes: fine for CPU runs).
"""

from __future__ import annotations

import torch

from momtitan.ops.segments import bucket_of_index


def naive_grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Row by row: the specification."""
    group = bucket_of_index(group_ends, x.shape[0])
    return torch.einsum("ri,roi->ro", x, weight[group])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """`x [R, in]`, `weight [G, out, in]`, `group_ends [G]` int32 (non-decreasing, last = R) -> `[R, out]`."""
    if x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=group_ends.to(torch.int32))
    group = bucket_of_index(group_ends, x.shape[0])
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for g in range(weight.shape[0]):
        out = torch.where((group == g)[:, None], x @ weight[g].transpose(0, 1), out)
    return out
