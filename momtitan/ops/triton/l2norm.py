"""The recurrence's fused q/k L2 norm: the reciprocal row norms it reads, and its backward, each in
one pass.

The kernels read q and k through reciprocal row norms `r = 1 / max(|x|, eps)` (fp32, one per row;
`reciprocal_norms`) and return gradients w.r.t. the normalised rows, `dxn` (fp32). Through
`xn = x * r`:

    dx = r * (dxn - xn * <xn, dxn>)

`reciprocal_norms_reference` and `l2norm_bwd_reference` are the PyTorch forms (the norm an fp32
reduction plus two elementwise passes; the backward six full passes over fp32 tensors, plus the
cast to x's dtype); `reciprocal_norms` and `l2norm_bwd` compute them in one Triton kernel each, which
reads its inputs once.
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


def l2norm_bwd_reference(x: torch.Tensor, r: torch.Tensor, dxn: torch.Tensor) -> torch.Tensor:
    """`x [..., K]`, `r [...]` (reciprocal norms, fp32), `dxn [..., K]` -> `dx` in fp32."""
    xn = x.to(torch.float32) * r[..., None]
    return r[..., None] * (dxn - xn * (xn * dxn).sum(-1, keepdim=True))


@triton.jit
def l2norm_bwd_kernel(x_ptr, r_ptr, dxn_ptr, dx_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    m = (rows < R)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + rows, mask=rows < R, other=0.0)
    g = tl.load(dxn_ptr + off, mask=m, other=0.0)
    xn = x * r[:, None]
    dx = r[:, None] * (g - xn * tl.sum(xn * g, 1)[:, None])
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


def l2norm_bwd(x: torch.Tensor, r: torch.Tensor, dxn: torch.Tensor) -> torch.Tensor:
    """`l2norm_bwd_reference` in one kernel; `dx` in x's dtype. All three contiguous, `x`/`dxn` of the
    same shape `[..., K]`, `r` of shape `[...]`."""
    K = x.shape[-1]
    R = x.numel() // K
    dx = torch.empty_like(x)
    BK = pow2(K)
    BR = max(1, 4096 // BK)
    l2norm_bwd_kernel[(triton.cdiv(R, BR),)](x, r, dxn, dx, R, K, BR=BR, BK=BK, num_warps=4)
    return dx
