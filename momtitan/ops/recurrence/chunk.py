"""The linear recurrence in chunks, in plain PyTorch: the CPU path, and the readable form of the
algorithm the Triton kernels implement.

Layout. The tokens (rows of a batch, or the packed sequences of `cu_seqlens`) are laid out in one
stream in which every sequence starts at a chunk boundary: each sequence is padded with zeros to a
multiple of the chunk size `C`. A zero token (k = v = beta = g = 0) leaves the state as it is, so the
padding needs no masks. The padded length is at most `T + N*(C-1)`, a bound known from shapes alone,
so nothing here syncs with the host. Resets inside a sequence are handled with masks.

Within a chunk, with `gamma_i` the cumulative log-decay from the chunk start to token `i` and
`D_ij = exp(gamma_i - gamma_j)` for `j <= i` in the same run (0 elsewhere), the recurrence
`S_i = exp(g_i) S_{i-1} + k_i u_i^T` unrolls to

    S_i = c_i S_0 + sum_{j<=i} D_ij k_j u_j^T          (c_i = exp(gamma_i), or 0 after a reset)

For the plain rule `u = v`. For the delta rule `u_i = beta_i (v_i - (exp(g_i) S_{i-1})^T k_i)`, so

    (I + A) u = beta*v - (beta*c*k) S_0,   A_ij = beta_i D_ij k_i.k_j  (j < i)

and with `U = (I+A)^-1 (beta*v)` and `W = (I+A)^-1 (beta*c*k)`, `u = U - W S_0` (the WY / UT form).
The outputs are `o = scale * ((c*q - P W) S_0 + P U)` with `P = (q k^T) * D` (diagonal included), and
the chunk's end state is `S_C = (c_C I - Kd^T W) S_0 + Kd^T U`, `Kd_j = D_Cj k_j`. Everything but
the last line is batched over all chunks at once; the last line is a short loop over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momtitan.ops.recurrence.naive import QK_NORM_EPS

from momtitan.ops.segments import bucket_of_index, padded_num_chunks, token_segments, uniform_cu_seqlens


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_linear_recurrence(
    q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, reset=None, qk_l2norm=False, chunk_size=64,
):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _state_dtype(q.dtype)
    device = q.device
    cu = uniform_cu_seqlens(B, T, device) if cu_seqlens is None else cu_seqlens.long()
    N = cu.numel() - 1
    total = B * T

    q = q.reshape(total, H, K).to(dtype)
    k = k.reshape(total, H, K).to(dtype)
    v = v.reshape(total, H, V).to(dtype)
    if qk_l2norm:
        q, k = F.normalize(q, dim=-1, eps=QK_NORM_EPS), F.normalize(k, dim=-1, eps=QK_NORM_EPS)

    # Padded layout: sequence n occupies chunks [pad_start[n] / C, pad_end[n] / C).
    lengths = cu[1:] - cu[:-1]
    pad_end = torch.cumsum((lengths + C - 1) // C * C, dim=0)
    pad_start = pad_end - (lengths + C - 1) // C * C
    seg = token_segments(cu, total)
    dest = pad_start[seg] + torch.arange(total, device=device) - cu[seg]
    NC = padded_num_chunks(total, N, C)

    def to_chunks(x):  # [total, ...] -> [NC, H, C, ...] (heads first), zeros in the padding
        x = x.new_zeros(NC * C, *x.shape[1:]).index_copy(0, dest, x)
        return x.view(NC, C, *x.shape[1:]).transpose(1, 2)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)  # [NC, H, C, K|V]
    if g is not None:
        gamma = torch.cumsum(to_chunks(g.reshape(total, H).to(dtype)), dim=-1)  # [NC, H, C]
    else:
        gamma = qc.new_zeros(NC, H, C)
    if reset is not None:
        runs = torch.cumsum(to_chunks(reset.reshape(total, 1).to(torch.int64))[:, 0], dim=-1)  # [NC, C]
    else:
        runs = torch.zeros(NC, C, dtype=torch.int64, device=device)

    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    in_run = (runs[:, :, None] == runs[:, None, :])[:, None]  # [NC, 1, C, C]
    mask = causal & in_run
    decay = torch.exp((gamma[..., :, None] - gamma[..., None, :]).masked_fill(~mask, float("-inf")))
    carry = torch.exp(gamma) * (runs == 0)[:, None, :]  # [NC, H, C]: how much of S_0 token i sees
    end_weight = torch.exp(gamma[..., -1:] - gamma) * (runs == runs[:, -1:])[:, None, :]
    kd = kc * end_weight[..., None]  # [NC, H, C, K]
    P = (qc @ kc.transpose(-1, -2)) * decay  # [NC, H, C, C]
    q_state = qc * carry[..., None]

    if beta is not None:
        bc = to_chunks(beta.reshape(total, H).to(dtype))  # [NC, H, C]
        A = (bc[..., :, None] * decay * (kc @ kc.transpose(-1, -2))).tril(-1)
        eye_c = torch.eye(C, dtype=dtype, device=device)
        rhs = torch.cat([bc[..., None] * vc, (bc * carry)[..., None] * kc], dim=-1)
        UW = torch.linalg.solve_triangular(A + eye_c, rhs, upper=False, unitriangular=True)
        U, W = UW[..., :V], UW[..., V:]
        transition = carry[..., -1, None, None] * torch.eye(K, dtype=dtype, device=device) - kd.transpose(-1, -2) @ W
        q_state = q_state - P @ W
    else:
        U = vc
        transition = None
    update = kd.transpose(-1, -2) @ U  # [NC, H, K, V]

    # The only sequential part: carry the state from chunk to chunk, restarting at each sequence.
    chunk_pos = torch.arange(NC, device=device) * C
    chunk_seg = bucket_of_index(pad_end // C, NC).clamp(max=max(N - 1, 0))
    chunk_first = chunk_pos == pad_start[chunk_seg]
    if initial_state is None:
        h0 = q.new_zeros(N, H, K, V)
    else:
        h0 = initial_state.to(dtype)
    S = h0.new_zeros(H, K, V)
    states_in = []
    for c in range(NC):
        S = torch.where(chunk_first[c], h0.index_select(0, chunk_seg[c : c + 1])[0], S)
        states_in.append(S)
        S = (transition[c] @ S if transition is not None else carry[c, :, -1, None, None] * S) + update[c]
    S_in = torch.stack(states_in)  # [NC, H, K, V]

    o = scale * (q_state @ S_in + P @ U)  # [NC, H, C, V]
    o = o.transpose(1, 2).reshape(NC * C, H, V)[dest].reshape(B, T, H, V)

    final_state = None
    if output_final_state:
        if transition is not None:
            S_out = transition @ S_in + update
        else:
            S_out = carry[..., -1, None, None] * S_in + update
        last_chunk = (pad_end // C - 1).clamp(min=0)
        final_state = torch.where((lengths > 0)[:, None, None, None], S_out[last_chunk], h0)
    return o.to(out_dtype), final_state
