"""Fused decode step: `linear_recurrence_step` as one Triton kernel over (row, head, V-block),
reading and writing `state[index[r]]` in place (no gather/scatter copies), registered as the
custom op `momtitan::linear_recurrence_step`, which mutates `state`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momtitan.ops.recurrence.naive import QK_NORM_EPS
from momtitan.ops.triton.common import pow2


@triton.jit
def step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, index_ptr, o_ptr,
    scale, H, K, V,
    BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, L2: tl.constexpr, EPS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2)
    row = tl.load(index_ptr + r).to(tl.int64)
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    km = kk < K
    vm = vv < V
    qv = tl.load(q_ptr + (r * H + h) * K + kk, mask=km, other=0.0).to(tl.float32)
    kv = tl.load(k_ptr + (r * H + h) * K + kk, mask=km, other=0.0).to(tl.float32)
    vt = tl.load(v_ptr + (r * H + h) * V + vv, mask=vm, other=0.0).to(tl.float32)
    if L2:
        qv = qv / tl.maximum(tl.sqrt(tl.sum(qv * qv, 0)), EPS)
        kv = kv / tl.maximum(tl.sqrt(tl.sum(kv * kv, 0)), EPS)
    sptr = state_ptr + ((row * H + h) * K + kk[:, None]) * V + vv[None, :]
    smask = km[:, None] & vm[None, :]
    S = tl.load(sptr, mask=smask, other=0.0).to(tl.float32)
    if HAS_G:
        S = S * tl.exp(tl.load(g_ptr + r * H + h).to(tl.float32))
    if HAS_BETA:
        b = tl.load(beta_ptr + r * H + h).to(tl.float32)
        u = b * (vt - tl.sum(S * kv[:, None], 0))
    else:
        u = vt
    S = S + kv[:, None] * u[None, :]
    tl.store(sptr, S.to(state_ptr.dtype.element_ty), mask=smask)
    o = scale * tl.sum(S * qv[:, None], 0)
    tl.store(o_ptr + (r * H + h) * V + vv, o.to(o_ptr.dtype.element_ty), mask=vm)


@torch.library.custom_op("momtitan::linear_recurrence_step", mutates_args=("state",))
def linear_recurrence_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    state: torch.Tensor, index: torch.Tensor, scale: float, qk_l2norm: bool,
) -> torch.Tensor:
    R, H, K = q.shape
    V = v.shape[-1]
    if not state.is_contiguous():
        raise ValueError("the Triton decode step needs a contiguous state table")
    o = v.new_empty(v.shape)  # contiguous: the kernel writes row r, head h at (r * H + h) * V
    if R == 0:
        return o
    BK = pow2(K)
    BV = min(pow2(V), 64 if BK <= 64 else 32)
    dummy = q.new_empty(1, dtype=torch.float32)
    step_kernel[(R, H, triton.cdiv(V, BV))](
        q.contiguous(), k.contiguous(), v.contiguous(),
        g.contiguous() if g is not None else dummy, beta.contiguous() if beta is not None else dummy,
        state, index.contiguous(), o, scale, H, K, V,
        BK=BK, BV=BV, HAS_G=g is not None, HAS_BETA=beta is not None, L2=qk_l2norm, EPS=QK_NORM_EPS,
        num_warps=4 if BK * BV <= 4096 else 8,
    )
    return o


@linear_recurrence_step_op.register_fake
def _(q, k, v, g, beta, state, index, scale, qk_l2norm):
    return v.new_empty(v.shape)


def triton_linear_recurrence_step(q, k, v, g, beta, state, index, *, scale=None, qk_l2norm=False):
    """`linear_recurrence_step` on the fused kernel (same arguments and results)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return linear_recurrence_step_op(q, k, v, g, beta, state, index, scale, qk_l2norm)
