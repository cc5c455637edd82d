"""One decoding step of the linear recurrence, on the rows of a state table picked by an index.

`state` holds one `[H, K, V]` state per memory stream (for MoM: every (memory, sequence) pair).
Only the rows named by `index` are read and written back, in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momtitan.checks import autograd_records, require_optional_float, require_same_device
from momtitan.ops.recurrence.naive import QK_NORM_EPS


def linear_recurrence_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor,
    index: torch.Tensor,
    *,
    scale: float | None = None,
    qk_l2norm: bool = False,
) -> torch.Tensor:
    """Advance `state[index]` by one token and return the outputs.

    Args:
        q, k: `[R, H, K]`; v: `[R, H, V]`; g, beta: `[R, H]` or None (as in `linear_recurrence`).
        state: `[S, H, K, V]` state table, updated in place.
        index: `[R]` distinct rows of `state`, one per input row.
    Returns `o [R, H, V]` in the dtype of v. Shapes, dtypes and devices are checked; `index` must
    hold distinct rows in `[0, S)`, which is not checked (that would need a host sync per step).
    """
    check_step_inputs(q, k, v, g, beta, state, index, scale)
    return _linear_recurrence_step(q, k, v, g, beta, state, index, scale=scale, qk_l2norm=qk_l2norm)


def _linear_recurrence_step(q, k, v, g, beta, state, index, *, scale=None, qk_l2norm=False):
    """`linear_recurrence_step` without the argument checks: for the MoM layer's decode step, which
    builds its arguments itself (the checks' Python cost would repeat per layer and token)."""
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if state.is_cuda and state.is_contiguous() and not autograd_records(q, k, v, g, beta, state):
        from momtitan.ops.triton import supports, triton_linear_recurrence_step

        if supports(q, v) and state.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # fused kernel: updates state[index] in place, computes in fp32
            return triton_linear_recurrence_step(q, k, v, g, beta, state, index, scale=scale, qk_l2norm=qk_l2norm)
    out_dtype, dtype = v.dtype, state.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if qk_l2norm:
        q, k = F.normalize(q, dim=-1, eps=QK_NORM_EPS), F.normalize(k, dim=-1, eps=QK_NORM_EPS)
    S = state.index_select(0, index)
    if g is not None:
        S = S * torch.exp(g.to(dtype))[..., None, None]
    if beta is not None:
        u = beta.to(dtype)[..., None] * (v - torch.einsum("rhkv,rhk->rhv", S, k))
    else:
        u = v
    S = S + k[..., :, None] * u[..., None, :]
    state.index_copy_(0, index, S)
    return (scale * torch.einsum("rhkv,rhk->rhv", S, q)).to(out_dtype)


def check_step_inputs(q, k, v, g, beta, state, index, scale) -> None:
    """Shape, dtype and device checks of `linear_recurrence_step` (no host syncs)."""
    for name, x, dims, what in (("q", q, 3, "[R, H, K]"), ("k", k, 3, "[R, H, K]"), ("v", v, 3, "[R, H, V]"),
                                ("state", state, 4, "[S, H, K, V]"), ("index", index, 1, "[R]")):
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            raise ValueError(f"{name} must be a {what} tensor, got {getattr(x, 'shape', type(x).__name__)}")
    R, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != (R, H):
        raise ValueError(f"k must be [R, H, K] = {tuple(q.shape)} and v [R, H, V] with R, H = {R}, {H}, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if state.shape[1:] != (H, K, V):
        raise ValueError(f"state must be [S, H, K, V] with H, K, V = {H}, {K}, {V}, got {tuple(state.shape)}")
    if index.shape != (R,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an int32/int64 [R = {R}] tensor, got {index.dtype} {tuple(index.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x is not None and (not isinstance(x, torch.Tensor) or x.shape != (R, H)):
            raise ValueError(f"{name} must be [R, H] = {(R, H)} or None, got {getattr(x, 'shape', type(x).__name__)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("state", state), ("g", g), ("beta", beta)):
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    require_optional_float("scale", scale)
    require_same_device("state", state, q=q, k=k, v=v, g=g, beta=beta, index=index)

