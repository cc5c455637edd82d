"""The backward of the recurrence's fused q/k L2 norm, in one pass.

The kernels read q and k through reciprocal row norms `r = 1 / max(|x|, eps)` and return gradients
w.r.t. the normalised rows, `dxn` (fp32). Through `xn = x * r`:

    dx = r * (dxn - xn * <xn, dxn>)

`l2norm_bwd_reference` is that formula in PyTorch (six full passes over fp32 tensors, plus the cast
to x's dtype); `l2norm_bwd` computes it in one Triton kernel that reads x, r and dxn once and writes
dx in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momtitan.ops.triton.common import pow2


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
