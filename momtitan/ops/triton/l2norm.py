"""The recurrence's fused q/k L2 norm: the reciprocal row norms it reads, in one pass.

The kernels read q and k through reciprocal row norms `r = 1 / max(|x|, eps)` (fp32, one per row),
computed once in the forward and kept for the backward. The gradient kernel applies the norm's
backward itself (`bwd_kernels.grads_kernel`: dx = r (dxn - xn <xn, dxn>) with xn = x r).
`reciprocal_norms_reference` is the PyTorch form; `reciprocal_norms` computes it in one kernel,
which reads x once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momtitan.ops.recurrence.naive import QK_NORM_EPS
from momtitan.ops.triton.common import pow2


def reciprocal_norms_reference(x: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` -> `1 / max(|x|, QK_NORM_EPS)` over K, shape `[...]`, in fp32 (fp64 for fp64 inputs)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(QK_NORM_EPS).reciprocal()


@triton.jit
def rnorm_kernel(x_ptr, r_ptr, R, K, EPS: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    m = (rows < R)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    tl.store(r_ptr + rows, 1.0 / tl.maximum(norm, EPS), mask=rows < R)


def reciprocal_norms(x: torch.Tensor) -> torch.Tensor:
    """`reciprocal_norms_reference` in one kernel; `x [..., K]` contiguous."""
    K = x.shape[-1]
    R = x.numel() // K
    r = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    BK = pow2(K)
    BR = max(1, 4096 // BK)
    rnorm_kernel[(triton.cdiv(R, BR),)](x, r, R, K, EPS=QK_NORM_EPS, BR=BR, BK=BK, num_warps=4)
    return r
