"""Forward Triton kernels of the chunked linear recurrence (algorithm: `recurrence/chunk.py`).

1. `prepare_kernel`  per (chunk, head): A, T = (I + A)^-1 by forward substitution, and the WY
   factors W = T (beta*carry*k), U = T (beta*v)   (delta rules only).
2. `state_kernel`    per (segment, head, V-block): the sequential pass over the segment's chunks;
   stores each chunk's start state h, the corrected values u = U - W h (delta rules), the final state.
3. `output_kernel`   per (chunk, head, V-block): o = scale * ((carry*q) h + (q k^T * D) u).

q/k L2 normalisation is fused: kernels scale rows by precomputed reciprocal norms `rq`, `rk`.
Tensors in token layout are `[total, H, *]`; W, U, u live in the padded layout `[NC*C, H, *]`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from momtitan.ops.triton.common import (
    chunk_gates, chunk_rows, chunk_weights, decay_matrix, mdot, row_scales, unit_lower_inverse,
)


@triton.jit
def prepare_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, r_ptr, rk_ptr, info_ptr, w_ptr, u_ptr, t_ptr,
    H, K, V,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr, STORE_T: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, C)
    tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    gamma, run = chunk_gates(g_ptr, r_ptr, tok, valid, h, H, C, HAS_G, HAS_RESET)
    carry, e, c_end = chunk_weights(gamma, run, C)
    b = tl.load(beta_ptr + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    rk = row_scales(rk_ptr, tok, valid, h, H, L2)

    KK = tl.zeros([C, C], dtype=tl.float32)
    for kb in tl.static_range(NKB):
        kk = kb * BK + tl.arange(0, BK)
        kt = tl.load(k_ptr + (tok[:, None] * H + h) * K + kk[None, :], mask=valid[:, None] & (kk < K)[None, :], other=0.0)
        KK += mdot(kt, tl.trans(kt), DOT_MODE)
    KK = KK * rk[:, None] * rk[None, :]
    D = decay_matrix(gamma, run, C)
    A = tl.where(i[:, None] > i[None, :], b[:, None] * D * KK, 0.0)
    T = unit_lower_inverse(A, C)
    if STORE_T:
        tl.store(t_ptr + ((c * H + h) * C + i[:, None]) * C + i[None, :], T)

    wk = rk * b * carry
    for kb in tl.static_range(NKB):
        kk = kb * BK + tl.arange(0, BK)
        kt = tl.load(k_ptr + (tok[:, None] * H + h) * K + kk[None, :], mask=valid[:, None] & (kk < K)[None, :], other=0.0)
        W = mdot(T, kt.to(tl.float32) * wk[:, None], DOT_MODE)
        tl.store(w_ptr + (prow[:, None] * H + h) * K + kk[None, :], W.to(w_ptr.dtype.element_ty), mask=(kk < K)[None, :])
    for vb in tl.static_range(NVB):
        vv = vb * BV + tl.arange(0, BV)
        vt = tl.load(v_ptr + (tok[:, None] * H + h) * V + vv[None, :], mask=valid[:, None] & (vv < V)[None, :], other=0.0)
        U = mdot(T, vt.to(tl.float32) * b[:, None], DOT_MODE)
        tl.store(u_ptr + (prow[:, None] * H + h) * V + vv[None, :], U.to(u_ptr.dtype.element_ty), mask=(vv < V)[None, :])


@triton.jit
def state_kernel(
    k_ptr, v_ptr, g_ptr, r_ptr, rk_ptr, info_ptr, seg_ptr, w_ptr, uin_ptr, h0_ptr,
    h_ptr, unew_ptr, ht_ptr,
    H, K, V,
    C: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr, DELTA: tl.constexpr,
    HAS_H0: tl.constexpr, DOT_MODE: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2)
    c_start = tl.load(seg_ptr + 2 * n)
    c_end_ = tl.load(seg_ptr + 2 * n + 1)
    kk = tl.arange(0, BKF)
    vv = vb * BV + tl.arange(0, BV)
    km = kk < K
    vm = vv < V
    smask = km[:, None] & vm[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + ((n * H + h) * K + kk[:, None]) * V + vv[None, :], mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BKF, BV], dtype=tl.float32)
    for cc in range(c_start, c_end_):
        c = cc  # int64: the bounds are int64
        tl.store(h_ptr + ((c * H + h) * K + kk[:, None]) * V + vv[None, :], S.to(h_ptr.dtype.element_ty), mask=smask)
        tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
        gamma, run = chunk_gates(g_ptr, r_ptr, tok, valid, h, H, C, HAS_G, HAS_RESET)
        carry, e, c_end = chunk_weights(gamma, run, C)
        e = e * row_scales(rk_ptr, tok, valid, h, H, L2)  # rows past the end have k = 0 anyway
        kt = tl.load(k_ptr + (tok[:, None] * H + h) * K + kk[None, :], mask=valid[:, None] & km[None, :], other=0.0)
        if DELTA:
            Wt = tl.load(w_ptr + (prow[:, None] * H + h) * K + kk[None, :], mask=km[None, :], other=0.0)
            Ut = tl.load(uin_ptr + (prow[:, None] * H + h) * V + vv[None, :], mask=vm[None, :], other=0.0).to(tl.float32)
            u = Ut - mdot(Wt, S, DOT_MODE)
            tl.store(unew_ptr + (prow[:, None] * H + h) * V + vv[None, :], u.to(unew_ptr.dtype.element_ty), mask=vm[None, :])
        else:
            u = tl.load(v_ptr + (tok[:, None] * H + h) * V + vv[None, :], mask=valid[:, None] & vm[None, :], other=0.0).to(tl.float32)
        S = c_end * S + mdot(tl.trans(kt.to(tl.float32) * e[:, None]), u, DOT_MODE)
    tl.store(ht_ptr + ((n * H + h) * K + kk[:, None]) * V + vv[None, :], S, mask=smask)


@triton.jit
def output_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, r_ptr, rq_ptr, rk_ptr, info_ptr, h_ptr, u_ptr, o_ptr,
    scale, H, K, V,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr, DELTA: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2)
    tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    vv = vb * BV + tl.arange(0, BV)
    vm = vv < V
    gamma, run = chunk_gates(g_ptr, r_ptr, tok, valid, h, H, C, HAS_G, HAS_RESET)
    carry, e, c_end = chunk_weights(gamma, run, C)
    rq = row_scales(rq_ptr, tok, valid, h, H, L2)
    rk = row_scales(rk_ptr, tok, valid, h, H, L2)
    QK = tl.zeros([C, C], dtype=tl.float32)
    qS = tl.zeros([C, BV], dtype=tl.float32)
    for kb in tl.static_range(NKB):
        kk = kb * BK + tl.arange(0, BK)
        km = kk < K
        qt = tl.load(q_ptr + (tok[:, None] * H + h) * K + kk[None, :], mask=valid[:, None] & km[None, :], other=0.0)
        kt = tl.load(k_ptr + (tok[:, None] * H + h) * K + kk[None, :], mask=valid[:, None] & km[None, :], other=0.0)
        QK += mdot(qt, tl.trans(kt), DOT_MODE)
        S0 = tl.load(h_ptr + ((c * H + h) * K + kk[:, None]) * V + vv[None, :], mask=km[:, None] & vm[None, :] & (nvalid > 0), other=0.0)
        qS += mdot(qt.to(tl.float32) * (rq * carry)[:, None], S0, DOT_MODE)
    P = QK * (rq[:, None] * rk[None, :]) * decay_matrix(gamma, run, C)
    if DELTA:
        u = tl.load(u_ptr + (prow[:, None] * H + h) * V + vv[None, :], mask=valid[:, None] & vm[None, :], other=0.0)
    else:
        u = tl.load(v_ptr + (tok[:, None] * H + h) * V + vv[None, :], mask=valid[:, None] & vm[None, :], other=0.0)
    o = scale * (qS + mdot(P, u.to(tl.float32), DOT_MODE))
    tl.store(o_ptr + (tok[:, None] * H + h) * V + vv[None, :], o.to(o_ptr.dtype.element_ty), mask=valid[:, None] & vm[None, :])
