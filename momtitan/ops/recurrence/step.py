"""One decoding step of the linear recurrence, on the rows of a state table picked by an index.

`state` holds one `[H, K, V]` state per memory stream (for MoM: every (memory, sequence) pair).
Only the rows named by `index` are read and written back, in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    Returns `o [R, H, V]` in the dtype of v.
    """
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if state.is_cuda and state.is_contiguous() and not _needs_grad(q, k, v, g, beta, state):
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


def _needs_grad(*tensors) -> bool:
    """The fused step kernel has no backward: keep the PyTorch path when autograd is recording."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
