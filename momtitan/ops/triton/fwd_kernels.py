"""Forward Triton kernels of the chunked linear recurrence (algorithm: `recurrence/chunk.py`).

1. `gates_kernel`    per (chunk, head): the chunk's cumulative log-decay and run ids, read by every
   chunk kernel below and by the backward's (no kernel scans g again), and the row weights of the
   sequential passes (no scans in their loops).
2. `inverse_kernel`  per (chunk, head), in 16-row blocks: A, T = (I + A)^-1 (diagonal blocks by
   forward substitution, the rest by 16-wide dots), stored whole ([NC, H, C, C], in the inputs'
   dtype; the backward keeps the forward's). `wy_kernel` per (chunk, head): the WY factors
   W = T (beta*carry*k), U = T (beta*v) from T as one [C, C] tile, one full-width dot per column
   block (delta rules only).
3. `state_kernel`    per (segment, head, V-block): the sequential pass over the segment's chunks;
   stores each chunk's start state h, the corrected values u = U - W h (delta rules), the final state.
4. `output_kernel`   per (chunk, head, V-block): o = scale * ((carry*q) h + (q k^T * D) u).

q/k L2 normalisation is fused: kernels scale rows by precomputed reciprocal norms `rq`, `rk`.
In the chunk kernels (all but `gates_kernel`) the head count H and head dims K, V are
compile-time constants, as the tiles are (one compile per model width): the row strides fold into the address arithmetic and the masks past K and V vanish
where the tiles cover them exactly, which frees registers in the sequential passes
(`scripts/kernel_registers.py`).
Tensors in token layout are `[total, H, *]`; W, U, u live in the padded layout `[NC*C, H, *]`, the
per-row values `gates_kernel` stores in `[NC, H, C]` (`common.gate_rows`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from momtitan.ops.triton.common import (
    blocks_plus_cols_times, chunk_gates, chunk_rows, chunk_weights, gate_rows, inverse_blocks, load_rows,
    load_state_blocks, mdot, row_scales, rows_times_blocks, segment_bounds, segment_chunk, start_weights,
    state_program, store_rows, store_state_blocks, stored_decay, stored_end_decay, stored_gates,
    stored_row_weights, stored_scales, tile_program,
)


@triton.jit
def _rows_tile(x_ptr, tok0, nvalid, h, H, D, dd, r: tl.constexpr, BS: tl.constexpr):
    """Rows `[r*BS, (r+1)*BS)` of a chunk of `x [total, H, D]`, columns `dd`; 0 past the chunk's end."""
    j = r * BS + tl.arange(0, BS)
    return tl.load(x_ptr + ((tok0 + j)[:, None] * H + h) * D + dd[None, :],
                   mask=(j < nvalid)[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _block_gates(gam_ptr, run_ptr, beta_ptr, rk_rows_ptr, c, tok0, nvalid, h, H, r: tl.constexpr, C: tl.constexpr,
                 BS: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr):
    """Row block r of chunk c: its stored log-decay and run ids, beta and rk (0 past the chunk's end)."""
    gamma, run = stored_gates(gam_ptr, run_ptr, c, r * BS, h, H, C, BS, HAS_G, HAS_RESET)
    j = r * BS + tl.arange(0, BS)
    b = tl.load(beta_ptr + (tok0 + j) * H + h, mask=j < nvalid, other=0.0).to(tl.float32)
    return gamma, run, b, stored_scales(rk_rows_ptr, c, r * BS, h, H, C, BS, j < nvalid, L2)


@triton.jit
def _a_block(KK, g_r, g_c, run_r, run_c, s_r, s_c, DIAG: tl.constexpr, BS: tl.constexpr):
    """Block (r, c) of A = tril(beta * D * (k k^T)), given its k k^T block, row scales s_r (beta * rk)
    and column scales s_c (rk); strictly lower on the diagonal."""
    m = run_r[:, None] == run_c[None, :]
    if DIAG:
        ii = tl.arange(0, BS)
        m = m & (ii[:, None] > ii[None, :])
    D = tl.where(m, tl.exp(tl.where(m, g_r[:, None] - g_c[None, :], 0.0)), 0.0)
    return s_r[:, None] * D * KK * s_c[None, :]


@triton.jit
def _store_block(t_ptr, c, h, H, x, r: tl.constexpr, q: tl.constexpr, C: tl.constexpr, BS: tl.constexpr):
    """Store `x [BS, BS]` as block (r, q) of chunk `c`'s `[C, C]` matrix in `T [NC, H, C, C]` (in its dtype)."""
    ii = tl.arange(0, BS)
    tl.store(t_ptr + ((c * H + h) * C + r * BS + ii[:, None]) * C + q * BS + ii[None, :], x.to(t_ptr.dtype.element_ty))


@triton.jit
def inverse_kernel(
    k_ptr, gam_ptr, beta_ptr, run_ptr, rk_rows_ptr, info_ptr, t_ptr,
    H: tl.constexpr, K: tl.constexpr,
    C: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Per (chunk, head), in blocks of BS rows (NB = C / BS = 1, 2 or 4): the blocks of A and of
    T = (I + A)^-1 (`inverse_blocks`), stored whole (the upper blocks as zeros). Its 16-wide tiles and
    the substitution's row reductions want few warps (a reduction across warps goes through shared
    memory and a barrier), the WY dots of `wy_kernel` want more: two kernels."""
    NB: tl.constexpr = C // BS
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    tok0 = tl.load(info_ptr + 2 * c)
    nvalid = tl.load(info_ptr + 2 * c + 1)

    # per row block, loaded as such: log-decay, run ids, beta, rk (blocks past NB are placeholders)
    g0, run0, b0, rk0 = _block_gates(gam_ptr, run_ptr, beta_ptr, rk_rows_ptr, c, tok0, nvalid, h, H, 0,
                                     C, BS, HAS_G, HAS_RESET, L2)
    g1, run1, b1, rk1 = g0, run0, b0, rk0
    g2, run2, b2, rk2 = g0, run0, b0, rk0
    g3, run3, b3, rk3 = g0, run0, b0, rk0
    if NB >= 2:
        g1, run1, b1, rk1 = _block_gates(gam_ptr, run_ptr, beta_ptr, rk_rows_ptr, c, tok0, nvalid, h, H, 1,
                                         C, BS, HAS_G, HAS_RESET, L2)
    if NB >= 4:
        g2, run2, b2, rk2 = _block_gates(gam_ptr, run_ptr, beta_ptr, rk_rows_ptr, c, tok0, nvalid, h, H, 2,
                                         C, BS, HAS_G, HAS_RESET, L2)
        g3, run3, b3, rk3 = _block_gates(gam_ptr, run_ptr, beta_ptr, rk_rows_ptr, c, tok0, nvalid, h, H, 3,
                                         C, BS, HAS_G, HAS_RESET, L2)

    # the lower blocks of k k^T
    Z = tl.zeros([BS, BS], dtype=tl.float32)
    KK00, KK10, KK11, KK20, KK21, KK22, KK30, KK31, KK32, KK33 = Z, Z, Z, Z, Z, Z, Z, Z, Z, Z
    for kb in tl.static_range(NKB):
        kk = kb * BK + tl.arange(0, BK)
        k0 = _rows_tile(k_ptr, tok0, nvalid, h, H, K, kk, 0, BS)
        KK00 += mdot(k0, tl.trans(k0), DOT_MODE)
        if NB >= 2:
            k1 = _rows_tile(k_ptr, tok0, nvalid, h, H, K, kk, 1, BS)
            KK10 += mdot(k1, tl.trans(k0), DOT_MODE)
            KK11 += mdot(k1, tl.trans(k1), DOT_MODE)
        if NB >= 4:
            k2 = _rows_tile(k_ptr, tok0, nvalid, h, H, K, kk, 2, BS)
            k3 = _rows_tile(k_ptr, tok0, nvalid, h, H, K, kk, 3, BS)
            KK20 += mdot(k2, tl.trans(k0), DOT_MODE)
            KK21 += mdot(k2, tl.trans(k1), DOT_MODE)
            KK22 += mdot(k2, tl.trans(k2), DOT_MODE)
            KK30 += mdot(k3, tl.trans(k0), DOT_MODE)
            KK31 += mdot(k3, tl.trans(k1), DOT_MODE)
            KK32 += mdot(k3, tl.trans(k2), DOT_MODE)
            KK33 += mdot(k3, tl.trans(k3), DOT_MODE)
    s0, s1, s2, s3 = b0 * rk0, b1 * rk1, b2 * rk2, b3 * rk3
    A00 = _a_block(KK00, g0, g0, run0, run0, s0, rk0, True, BS)
    A10, A11, A20, A21, A22, A30, A31, A32, A33 = Z, Z, Z, Z, Z, Z, Z, Z, Z
    if NB >= 2:
        A10 = _a_block(KK10, g1, g0, run1, run0, s1, rk0, False, BS)
        A11 = _a_block(KK11, g1, g1, run1, run1, s1, rk1, True, BS)
    if NB >= 4:
        A20 = _a_block(KK20, g2, g0, run2, run0, s2, rk0, False, BS)
        A21 = _a_block(KK21, g2, g1, run2, run1, s2, rk1, False, BS)
        A22 = _a_block(KK22, g2, g2, run2, run2, s2, rk2, True, BS)
        A30 = _a_block(KK30, g3, g0, run3, run0, s3, rk0, False, BS)
        A31 = _a_block(KK31, g3, g1, run3, run1, s3, rk1, False, BS)
        A32 = _a_block(KK32, g3, g2, run3, run2, s3, rk2, False, BS)
        A33 = _a_block(KK33, g3, g3, run3, run3, s3, rk3, True, BS)
    X00, X10, X11, X20, X21, X22, X30, X31, X32, X33 = inverse_blocks(
        A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, NB, BS)
    for r in tl.static_range(NB):  # the zero upper blocks
        for q in tl.static_range(r + 1, NB):
            _store_block(t_ptr, c, h, H, Z, r, q, C, BS)
    _store_block(t_ptr, c, h, H, X00, 0, 0, C, BS)
    if NB >= 2:
        _store_block(t_ptr, c, h, H, X10, 1, 0, C, BS)
        _store_block(t_ptr, c, h, H, X11, 1, 1, C, BS)
    if NB >= 4:
        _store_block(t_ptr, c, h, H, X20, 2, 0, C, BS)
        _store_block(t_ptr, c, h, H, X21, 2, 1, C, BS)
        _store_block(t_ptr, c, h, H, X22, 2, 2, C, BS)
        _store_block(t_ptr, c, h, H, X30, 3, 0, C, BS)
        _store_block(t_ptr, c, h, H, X31, 3, 1, C, BS)
        _store_block(t_ptr, c, h, H, X32, 3, 2, C, BS)
        _store_block(t_ptr, c, h, H, X33, 3, 3, C, BS)


@triton.jit
def wy_kernel(
    k_ptr, v_ptr, gam_ptr, beta_ptr, run_ptr, rk_rows_ptr, info_ptr, t_ptr, w_ptr, u_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Per (chunk, head): the WY factors W = T (beta*carry*rk*k) and U = T (beta*v), from the chunk's
    T (`inverse_kernel`) as one [C, C] tile: one full-width dot per column block."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    tok0, tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    gamma, run = stored_gates(gam_ptr, run_ptr, c, 0, h, H, C, C, HAS_G, HAS_RESET)
    carry = start_weights(gamma, run)
    b = tl.load(beta_ptr + tok * H + h, mask=valid, other=0.0).to(tl.float32)
    wk = stored_scales(rk_rows_ptr, c, 0, h, H, C, C, valid, L2) * b * carry
    i = tl.arange(0, C)
    Tm = tl.load(t_ptr + (c * H + h) * C * C + (i[:, None] * C + i[None, :]))
    for kb in tl.static_range(NKB):
        x = load_rows(k_ptr, tok0, valid, h, H, K, kb * BK, BK, C).to(tl.float32) * wk[:, None]
        store_rows(w_ptr, c * C, valid, h, H, K, kb * BK, mdot(Tm, x, DOT_MODE), BK, C)
    for vb in tl.static_range(NVB):
        x = load_rows(v_ptr, tok0, valid, h, H, V, vb * BV, BV, C).to(tl.float32) * b[:, None]
        store_rows(u_ptr, c * C, valid, h, H, V, vb * BV, mdot(Tm, x, DOT_MODE), BV, C)


@triton.jit
def gates_kernel(
    g_ptr, r_ptr, rq_ptr, rk_ptr, info_ptr, gam_ptr, run_ptr, ke_ptr, qc_ptr, rq_rows_ptr, rk_rows_ptr, cend_ptr,
    H, C: tl.constexpr, NCOPY: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr,
):
    """Per (chunk, head), the chunk's gates, once, so that no other kernel scans or reduces them: the
    cumulative log-decay `gam` (with g) and the run ids `run` (with resets; stored by head 0), and the
    row weights of the sequential passes, `ke = e * rk` (each row's weight in the chunk's end state),
    `qc = carry * rq` (the start state's weight at each row), as `[NC, H, C]` (`gate_rows`), and `c_end`,
    `NCOPY` copies per (chunk, head) (`stored_end_decay`), as wide as the sequential passes' V tiles."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    _, tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    gamma, run = chunk_gates(g_ptr, r_ptr, tok, valid, h, H, C, HAS_G, HAS_RESET)
    carry, e, c_end = chunk_weights(gamma, run, C)
    rows = gate_rows(c, h, H, C) + tl.arange(0, C)
    if HAS_G:
        tl.store(gam_ptr + rows, gamma)
    if HAS_RESET:
        if h == 0:
            tl.store(run_ptr + prow, run)
    rq = row_scales(rq_ptr, tok, valid, h, H, L2)
    rk = row_scales(rk_ptr, tok, valid, h, H, L2)
    tl.store(ke_ptr + rows, e * rk)
    tl.store(qc_ptr + rows, carry * rq)
    if L2:
        tl.store(rq_rows_ptr + rows, rq)
        tl.store(rk_rows_ptr + rows, rk)
    tl.store(cend_ptr + (c * H + h) * NCOPY + tl.arange(0, NCOPY), tl.zeros([NCOPY], dtype=tl.float32) + c_end)


@triton.jit
def state_kernel(
    k_ptr, v_ptr, ke_ptr, cend_ptr, seg_ptr, w_ptr, uin_ptr, h0_ptr,
    h_ptr, unew_ptr, ht_ptr,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr, NKS: tl.constexpr,
    NCOPY: tl.constexpr, SIDE_BY_SIDE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """The sequential pass over one segment's chunks for one head and V tile, the state held as NKB
    `[BK, BV]` blocks (`common.load_state_blocks`). Without beta the state's rows evolve independently
    (`S1 = c_end S0 + k^T (e * v)`, row by row), so NKS programs can share a V tile, each NKB blocks of
    its rows from `k0` on; the delta rules' `u = U - W S0` needs every row (NKS = 1)."""
    n, h, v0, k0 = state_program(NVB, NKS, NKB, BK, BV, SIDE_BY_SIDE)
    vv = v0 + tl.arange(0, BV)
    c_start, c_stop, tok_lo, tok_hi = segment_bounds(seg_ptr, n)
    S1, S2, S3, S4 = load_state_blocks(h0_ptr, n, h, H, K, V, k0, vv, HAS_H0, BK, BV, NKB)
    # from gates_kernel, a chunk ahead (`stored_row_weights`): e * rk (0 past the end) and c_end
    e_next = stored_row_weights(ke_ptr, c_start, h, H, C, c_start < c_stop)
    c_end_next = stored_end_decay(cend_ptr, c_start, h, H, BV, NCOPY, c_start < c_stop)
    for cc in range(c_start, c_stop):
        c = cc  # int64: the bounds are int64
        e, c_end = e_next, c_end_next
        e_next = stored_row_weights(ke_ptr, c + 1, h, H, C, c + 1 < c_stop)
        c_end_next = stored_end_decay(cend_ptr, c + 1, h, H, BV, NCOPY, c + 1 < c_stop)
        store_state_blocks(h_ptr, c, h, H, K, V, k0, vv, S1, S2, S3, S4, BK, NKB)
        tok0, prow0, valid = segment_chunk(tok_lo, tok_hi, c, c_start, C)
        if DELTA:  # u = U - W S0
            u = load_rows(uin_ptr, prow0, valid, h, H, V, v0, BV, C).to(tl.float32) - rows_times_blocks(
                w_ptr, prow0, valid, h, H, K, S1, S2, S3, S4, BK, NKB, DOT_MODE, C)
            store_rows(unew_ptr, prow0, valid, h, H, V, v0, u, BV, C)
        else:
            u = load_rows(v_ptr, tok0, valid, h, H, V, v0, BV, C).to(tl.float32)
        # S1 = c_end S0 + k^T (e * u)
        S1, S2, S3, S4 = blocks_plus_cols_times(S1, S2, S3, S4, c_end, k_ptr, tok0, valid, h, H, K, k0,
                                                u * e[:, None], BK, NKB, DOT_MODE, C)
    store_state_blocks(ht_ptr, n, h, H, K, V, k0, vv, S1, S2, S3, S4, BK, NKB)


@triton.jit
def output_kernel(
    q_ptr, k_ptr, v_ptr, gam_ptr, run_ptr, qc_ptr, rq_rows_ptr, rk_rows_ptr, info_ptr, h_ptr, u_ptr, o_ptr,
    scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr, DELTA: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    c, vb = tile_program(NVB)
    h = tl.program_id(1).to(tl.int64)
    tok0, tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    v0 = vb * BV
    vv = v0 + tl.arange(0, BV)
    # carry * rq, from gates_kernel; unmasked (every chunk has its row): `stored_row_weights`' mask
    # would add 8 SASS instructions here
    qc = tl.load(qc_ptr + gate_rows(c, h, H, C) + tl.arange(0, C))
    rq = stored_scales(rq_rows_ptr, c, 0, h, H, C, C, valid, L2)
    rk = stored_scales(rk_rows_ptr, c, 0, h, H, C, C, valid, L2)
    # the loads that do not wait for the K loop's dots go first, so that their latency overlaps it
    D = (rq[:, None] * rk[None, :]) * stored_decay(gam_ptr, run_ptr, c, h, H, C, HAS_G, HAS_RESET, False)
    if DELTA:
        u = load_rows(u_ptr, c * C, valid, h, H, V, v0, BV, C)
    else:
        u = load_rows(v_ptr, tok0, valid, h, H, V, v0, BV, C)
    QK = tl.zeros([C, C], dtype=tl.float32)
    qS = tl.zeros([C, BV], dtype=tl.float32)
    for kb in tl.static_range(NKB):
        kk = kb * BK + tl.arange(0, BK)
        qt = load_rows(q_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
        kt = load_rows(k_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
        QK += mdot(qt, tl.trans(kt), DOT_MODE)
        # an empty chunk's start state is never written: not read either
        S0 = tl.load(h_ptr + (c * H + h) * K * V + (kk[:, None] * V + vv[None, :]),
                     mask=(kk < K)[:, None] & (vv < V)[None, :] & (nvalid > 0), other=0.0)
        qS += mdot(qt, S0, DOT_MODE)  # rows weighted after the loop: q stays in its dtype for the dot
    o = scale * (qS * qc[:, None] + mdot(QK * D, u, DOT_MODE))
    store_rows(o_ptr, tok0, valid, h, H, V, v0, o, BV, C)
