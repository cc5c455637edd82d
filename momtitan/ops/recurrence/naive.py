"""The linear recurrence token by token: the specification every faster path is tested against.

Per sequence and head, with a state `S [K, V]`:

    if reset[t]:   S <- 0
    if g given:    S <- exp(g_t) * S
    if beta given: S <- S + k_t (beta_t (v_t - S^T k_t))^T     (delta rule)
    else:          S <- S + k_t v_t^T                          (plain outer product)
    o_t = scale * S^T q_t

Python loops over sequences and tokens, host reads of `cu_seqlens`: slow, obvious, and only for tests.
With `qk_l2norm`, q and k are first divided by `max(|x|, QK_NORM_EPS)` row by row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QK_NORM_EPS = 1e-6  # the q/k L2 norm's floor, shared by every path (PyTorch and Triton)


def naive_linear_recurrence(
    q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, reset=None, qk_l2norm=False,
):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if qk_l2norm:
        q, k = F.normalize(q.to(state_dtype), dim=-1, eps=QK_NORM_EPS), F.normalize(k.to(state_dtype), dim=-1, eps=QK_NORM_EPS)
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    o = torch.zeros(B, T, H, V, dtype=state_dtype, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            S = torch.zeros(H, K, V, dtype=state_dtype, device=q.device)
        else:
            S = initial_state[n].to(state_dtype)
        for t in range(start, end):
            if reset is not None and bool(reset[b, t]):
                S = torch.zeros_like(S)
            kt, vt, qt = k[b, t].to(state_dtype), v[b, t].to(state_dtype), q[b, t].to(state_dtype)
            if g is not None:
                S = S * torch.exp(g[b, t].to(state_dtype))[:, None, None]
            if beta is not None:
                u = beta[b, t].to(state_dtype)[:, None] * (vt - torch.einsum("hkv,hk->hv", S, kt))
            else:
                u = vt
            S = S + torch.einsum("hk,hv->hkv", kt, u)
            o[b, t] = scale * torch.einsum("hkv,hk->hv", S, qt)
        finals.append(S)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final_state
