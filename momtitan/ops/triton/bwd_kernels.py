"""Backward Triton kernels of the chunked linear recurrence.

Per chunk (start state S0, end state S1, carry c, end weights e, decay D, P = (q k^T) * D):

    u  = U - W S0            (delta rules; u = v otherwise),  U = T (beta v),  W = T (beta c k)
    o  = s (c q) S0 + s P u
    S1 = c_end S0 + (e k)^T u

1. `local_du_kernel` per (chunk, head, V-block), chunk-parallel: for the delta rules, first, the
   state-independent part s P^T dO of du (it used to sit inside the sequential loop, repeated per
   V-block); for the rules without beta, after the reverse pass, dv = s P^T dO + (e k) dS1 whole, from
   the dS1 that pass stored.
2. `state_bwd_kernel` per (segment, head, V-block), chunks in reverse: stores dS1 per chunk (dh) and
   carries dS0 = c_end dS1 + s (c q)^T dO - W^T du back (at the segment start, the initial state's
   gradient); for the delta rules it forms du = s P^T dO + (e k) dS1 on the way, which dS0 needs.
   Without beta dS's rows evolve apart, so NKS programs may share a V tile, each a split of the rows.
3. `grads_kernel` per (chunk, head): everything else, with dbv = T^T du, dA = -dbv u^T (strictly
   lower), d(beta c k) = -dbv S0^T. A first pass over V forms the C x C products that do not depend
   on the K-block (dO u^T, dbv u^T and their transposes, dv) once; a second pass per K-block forms
   the terms through the states and writes that block of dq and dk. Gradients of gamma (cumulative
   log-decay) are turned into gradients of g by a reverse cumsum in the chunk.
With the L2 norm, the gradients w.r.t. the normalised q, k go to fp32 scratch until their row sums
cover every K block; the kernel then applies the norm's backward and writes dq, dk in the inputs' dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from momtitan.ops.triton.common import (
    blocks_plus_cols_times, chunk_rows, gate_rows, load_rows, load_state_blocks, mdot, rows_times_blocks,
    segment_bounds, segment_chunk, state_program, store_rows, store_state_blocks, stored_decay, stored_end_decay,
    stored_gates, stored_row_weights, stored_scales, stored_weights, tile_program,
)


@triton.jit
def local_du_kernel(
    q_ptr, k_ptr, gam_ptr, run_ptr, rq_rows_ptr, rk_rows_ptr, info_ptr, do_ptr, ke_ptr, dh_ptr, dul_ptr,
    scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr, DELTA: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Per (chunk, head, V-block), with `P = (q k^T) * D`: for the delta rules the part of du that does
    not depend on the carried state, `scale * P^T dO`, into the padded layout; otherwise dv whole,
    `scale * P^T dO + (e k) dS1` with the end state's gradient dS1 that the reverse pass stored (dh), in
    the token layout."""
    c, vb = tile_program(NVB)
    h = tl.program_id(1).to(tl.int64)
    vv = vb * BV + tl.arange(0, BV)
    tok0, tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    rq = stored_scales(rq_rows_ptr, c, 0, h, H, C, C, valid, L2)
    rk = stored_scales(rk_rows_ptr, c, 0, h, H, C, C, valid, L2)
    # P^T = (k q^T) * D^T, built directly: never tl.trans a dot result (Hopper miscompile); the loads that
    # do not wait for the K loop's dots go first, so that their latency overlaps it
    DT = (rk[:, None] * rq[None, :]) * stored_decay(gam_ptr, run_ptr, c, h, H, C, HAS_G, HAS_RESET, True)
    dO = load_rows(do_ptr, tok0, valid, h, H, V, vb * BV, BV, C)
    KQ = tl.zeros([C, C], dtype=tl.float32)
    kdh = tl.zeros([C, BV], dtype=tl.float32)  # k dS1 (without beta)
    for kb in tl.static_range(NKB):
        kk = kb * BK + tl.arange(0, BK)
        q2 = load_rows(q_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
        kt2 = load_rows(k_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
        KQ += mdot(kt2, tl.trans(q2), DOT_MODE)
        if not DELTA:  # an empty chunk's dS1 is never written: not read either
            dS1 = tl.load(dh_ptr + (c * H + h) * K * V + (kk[:, None] * V + vv[None, :]),
                          mask=(kk < K)[:, None] & (vv < V)[None, :] & (nvalid > 0), other=0.0)
            kdh += mdot(kt2, dS1, DOT_MODE)
    PT = KQ * DT
    du = scale * mdot(PT, dO, DOT_MODE)
    if DELTA:
        # every row of the padded chunk is written (0 past its end): the sequential pass reads them all
        store_rows(dul_ptr, c * C, tl.full([C], 1, tl.int1), h, H, V, vb * BV, du, BV, C)
    else:  # dv, in v's dtype; e * rk from gates_kernel (0 past the chunk's end)
        ke = tl.load(ke_ptr + gate_rows(c, h, H, C) + tl.arange(0, C))
        store_rows(dul_ptr, tok0, valid, h, H, V, vb * BV, du + ke[:, None] * kdh, BV, C)


@triton.jit
def state_bwd_kernel(
    q_ptr, k_ptr, ke_ptr, qc_ptr, cend_ptr, seg_ptr, w_ptr, do_ptr, dht_ptr, dul_ptr,
    dh_ptr, du_ptr, dh0_ptr,
    scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr, NKS: tl.constexpr,
    NCOPY: tl.constexpr, SIDE_BY_SIDE: tl.constexpr, DELTA: tl.constexpr, HAS_DHT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """The reverse sequential pass: per (segment, head, V-block), chunk by chunk from the end,
    stores each chunk's end-state gradient dh, for the delta rules the full du (the chunk-local part
    from `local_du_kernel` plus the state part), and dh0; dS is held as blocks, as in `state_kernel`,
    NKS programs each holding NKB blocks of its rows from `k0` on (NKS = 1 for the delta rules)."""
    n, h, v0, k0 = state_program(NVB, NKS, NKB, BK, BV, SIDE_BY_SIDE)
    vv = v0 + tl.arange(0, BV)
    c_start, c_stop, tok_lo, tok_hi = segment_bounds(seg_ptr, n)
    dS1, dS2, dS3, dS4 = load_state_blocks(dht_ptr, n, h, H, K, V, k0, vv, HAS_DHT, BK, BV, NKB)
    # from gates_kernel, a chunk ahead (`stored_row_weights`): e * rk (the delta rules' du), carry * rq
    # and c_end
    live = c_start < c_stop
    ke_next = tl.zeros([C], dtype=tl.float32)
    if DELTA:
        ke_next = stored_row_weights(ke_ptr, c_stop - 1, h, H, C, live)
    qc_next = stored_row_weights(qc_ptr, c_stop - 1, h, H, C, live)
    c_end_next = stored_end_decay(cend_ptr, c_stop - 1, h, H, BV, NCOPY, live)
    for cc in range(c_start, c_stop):
        c = c_start + c_stop - 1 - cc  # int64 bounds
        ke, qc, c_end = ke_next, qc_next, c_end_next
        if DELTA:
            ke_next = stored_row_weights(ke_ptr, c - 1, h, H, C, c > c_start)
        qc_next = stored_row_weights(qc_ptr, c - 1, h, H, C, c > c_start)
        c_end_next = stored_end_decay(cend_ptr, c - 1, h, H, BV, NCOPY, c > c_start)
        store_state_blocks(dh_ptr, c, h, H, K, V, k0, vv, dS1, dS2, dS3, dS4, BK, NKB)
        tok0, prow0, valid = segment_chunk(tok_lo, tok_hi, c, c_start, C)
        if DELTA:  # du = du_local + e * (k dS1)
            du = load_rows(dul_ptr, prow0, valid, h, H, V, v0, BV, C) + ke[:, None] * rows_times_blocks(
                k_ptr, tok0, valid, h, H, K, dS1, dS2, dS3, dS4, BK, NKB, DOT_MODE, C)
        # dS0 = c_end dS1 + scale (carry q)^T dO - W^T du
        dOq = load_rows(do_ptr, tok0, valid, h, H, V, v0, BV, C).to(tl.float32) * (scale * qc)[:, None]
        dS1, dS2, dS3, dS4 = blocks_plus_cols_times(dS1, dS2, dS3, dS4, c_end, q_ptr, tok0, valid, h, H, K, k0, dOq,
                                                    BK, NKB, DOT_MODE, C)
        if DELTA:
            store_rows(du_ptr, prow0, valid, h, H, V, v0, du, BV, C)
            dS1, dS2, dS3, dS4 = blocks_plus_cols_times(dS1, dS2, dS3, dS4, 1.0, w_ptr, prow0, valid, h, H, K, 0, -du,
                                                        BK, NKB, DOT_MODE, C)
    store_state_blocks(dh0_ptr, n, h, H, K, V, k0, vv, dS1, dS2, dS3, dS4, BK, NKB)


@triton.jit
def grads_kernel(
    q_ptr, k_ptr, v_ptr, gam_ptr, beta_ptr, run_ptr, rq_rows_ptr, rk_rows_ptr, info_ptr,
    t_ptr, h_ptr, dh_ptr, u_ptr, du_ptr, do_ptr,
    dq_ptr, dk_ptr, dqn_ptr, dkn_ptr, dv_ptr, dg_ptr, db_ptr,
    scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, L2: tl.constexpr, DELTA: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, C)
    tok0, tok, valid, prow, nvalid = chunk_rows(info_ptr, c, C)
    live = nvalid > 0
    gamma, run = stored_gates(gam_ptr, run_ptr, c, 0, h, H, C, C, HAS_G, HAS_RESET)
    carry, e, c_end = stored_weights(gam_ptr, run_ptr, c, h, H, gamma, run, C, HAS_G, HAS_RESET)
    D = stored_decay(gam_ptr, run_ptr, c, h, H, C, HAS_G, HAS_RESET, False)
    DT = stored_decay(gam_ptr, run_ptr, c, h, H, C, HAS_G, HAS_RESET, True)
    rq = stored_scales(rq_rows_ptr, c, 0, h, H, C, C, valid, L2)
    rk = stored_scales(rk_rows_ptr, c, 0, h, H, C, C, valid, L2)
    if DELTA:
        b = tl.load(beta_ptr + tok * H + h, mask=valid, other=0.0).to(tl.float32)
        Tm = tl.load(t_ptr + (c * H + h) * C * C + (i[:, None] * C + i[None, :]), mask=live, other=0.0)
    else:
        b = tl.zeros([C], dtype=tl.float32)
        Tm = tl.zeros([C, C], dtype=tl.float32)

    # The loops over V and K blocks stay loops (tl.range, not unrolled): unrolled, the scheduler hoisted
    # every block's loads beside the kernel's many live C x C tiles and ptxas spilled 2-3 KB per thread
    # (scripts/kernel_registers.py, sm_90, 8 warps; kept as loops, under 100 B).
    # Tiles that only enter dots stay in their stored dtype (mdot casts to the dot's); fp32 where they
    # enter sums.
    # Pass 1, over V: the C x C products, which do not depend on the K-block (and dv).
    dP = tl.zeros([C, C], dtype=tl.float32)  # dO u^T
    dPT = tl.zeros([C, C], dtype=tl.float32)  # u dO^T (its transpose, built directly)
    dA = tl.zeros([C, C], dtype=tl.float32)  # dbv u^T
    dAT = tl.zeros([C, C], dtype=tl.float32)  # u dbv^T
    dbeta = tl.zeros([C], dtype=tl.float32)  # sum_v v * dbv, then the K-block terms
    for vb in tl.range(0, NVB):
        dO = load_rows(do_ptr, tok0, valid, h, H, V, vb * BV, BV, C)
        vt = load_rows(v_ptr, tok0, valid, h, H, V, vb * BV, BV, C)
        if DELTA:
            ub = load_rows(u_ptr, c * C, valid, h, H, V, vb * BV, BV, C)
        else:
            ub = vt
        dP += mdot(dO, tl.trans(ub), DOT_MODE)
        dPT += mdot(ub, tl.trans(dO), DOT_MODE)
        if DELTA:
            dub = load_rows(du_ptr, c * C, valid, h, H, V, vb * BV, BV, C)
            dbv = mdot(tl.trans(Tm), dub, DOT_MODE)  # T^T du
            dbvT = mdot(tl.trans(dub), Tm, DOT_MODE)  # (T^T du)^T, not tl.trans(dbv)
            dA += mdot(dbv, tl.trans(ub), DOT_MODE)
            dAT += mdot(ub, dbvT, DOT_MODE)
            store_rows(dv_ptr, tok0, valid, h, H, V, vb * BV, b[:, None] * dbv, BV, C)
            dbeta += tl.sum(vt.to(tl.float32) * dbv, 1)

    QK = tl.zeros([C, C], dtype=tl.float32)
    KK = tl.zeros([C, C], dtype=tl.float32)
    for kb in tl.range(0, NKB):
        q2 = load_rows(q_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
        kt2 = load_rows(k_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
        QK += mdot(q2, tl.trans(kt2), DOT_MODE)
        KK += mdot(kt2, tl.trans(kt2), DOT_MODE)
    QK = QK * rq[:, None] * rk[None, :]
    KK = KK * rk[:, None] * rk[None, :]

    dDD = scale * dP * QK  # d(decay matrix), through P and (delta rules) A
    dPD = dP * D  # multiplies k for dq
    dPTD = dPT * DT  # multiplies q for dk
    if DELTA:
        dAm = tl.where(i[:, None] > i[None, :], -dA, 0.0)
        dKK = dAm * b[:, None] * D + tl.where(i[:, None] < i[None, :], -dAT, 0.0) * b[None, :] * DT  # dKK + dKK^T
        dbeta += tl.sum(dAm * D * KK, 1)
        dDD += dAm * b[:, None] * KK
    else:
        dKK = tl.zeros([C, C], dtype=tl.float32)
    dDD = dDD * D
    dgam_D = tl.sum(dDD, 1) - tl.sum(dDD, 0)  # d(gamma) through the decay matrix

    # Pass 2, per K-block: the terms through the states, and dq, dk.
    dc = tl.zeros([C], dtype=tl.float32)  # d(carry), summed over K-blocks
    de = tl.zeros([C], dtype=tl.float32)  # d(end weights)
    dcC = 0.0  # d(c_end)
    sq = tl.zeros([C], dtype=tl.float32)  # <qn, dqn> per row, for the L2 norm's backward
    sk = tl.zeros([C], dtype=tl.float32)  # <kn, dkn>
    for kb in tl.range(0, NKB):
        kk = kb * BK + tl.arange(0, BK)
        km = kk < K
        acc_qs = tl.zeros([C, BK], dtype=tl.float32)  # dO S0^T
        acc_ek = tl.zeros([C, BK], dtype=tl.float32)  # u dS1^T
        acc_us = tl.zeros([C, BK], dtype=tl.float32)  # du S0^T (dbv S0^T = T^T du S0^T after the V loop)
        for vb in tl.range(0, NVB):
            vv = vb * BV + tl.arange(0, BV)
            vm = vv < V
            # an empty chunk's states are never written: not read either
            smask = km[:, None] & vm[None, :] & live
            offs = (c * H + h) * K * V
            S0 = tl.load(h_ptr + offs + (kk[:, None] * V + vv[None, :]), mask=smask, other=0.0)
            dS1 = tl.load(dh_ptr + offs + (kk[:, None] * V + vv[None, :]), mask=smask, other=0.0)
            dO = load_rows(do_ptr, tok0, valid, h, H, V, vb * BV, BV, C)
            if DELTA:
                ub = load_rows(u_ptr, c * C, valid, h, H, V, vb * BV, BV, C)
            else:
                ub = load_rows(v_ptr, tok0, valid, h, H, V, vb * BV, BV, C)
            acc_qs += mdot(dO, tl.trans(S0), DOT_MODE)
            acc_ek += mdot(ub, tl.trans(dS1), DOT_MODE)
            dcC += tl.sum(tl.sum(S0.to(tl.float32) * dS1.to(tl.float32), 1), 0)
            if DELTA:
                # du's tile passes through a where (a no-op: load_rows zeroes the same rows) before its
                # dot. Loaded straight into the dot's operand, 16-bit du made this dot wrong on most runs
                # (Triton 3.6, H200: gated delta's dk / dg / dbeta at d = 64 and 256; compute-sanitizer's
                # initcheck and racecheck clean); with the where, every run passed (kernels.md, "Fixed")
                dub = load_rows(du_ptr, c * C, valid, h, H, V, vb * BV, BV, C)
                acc_us += mdot(tl.where(valid[:, None], dub, 0.0).to(dub.dtype), tl.trans(S0), DOT_MODE)
        if DELTA:
            acc_bk = mdot(tl.trans(Tm), acc_us, DOT_MODE)  # dbv S0^T: one T^T dot per K block
        qb = load_rows(q_ptr, tok0, valid, h, H, K, kb * BK, BK, C).to(tl.float32) * rq[:, None]
        kbt = load_rows(k_ptr, tok0, valid, h, H, K, kb * BK, BK, C).to(tl.float32) * rk[:, None]
        dq = scale * carry[:, None] * acc_qs + scale * mdot(dPD, kbt, DOT_MODE)
        dk = scale * mdot(dPTD, qb, DOT_MODE) + e[:, None] * acc_ek
        dc += scale * tl.sum(qb * acc_qs, 1)
        de += tl.sum(kbt * acc_ek, 1)
        if DELTA:
            dk += mdot(dKK, kbt, DOT_MODE) - (b * carry)[:, None] * acc_bk
            kdb = -tl.sum(kbt * acc_bk, 1)
            dc += b * kdb
            dbeta += carry * kdb
        if L2:  # gradients w.r.t. the normalised rows, in fp32 until the row sums are complete
            store_rows(dqn_ptr, tok0, valid, h, H, K, kb * BK, dq, BK, C)
            store_rows(dkn_ptr, tok0, valid, h, H, K, kb * BK, dk, BK, C)
            sq += tl.sum(qb * dq, 1)
            sk += tl.sum(kbt * dk, 1)
        else:
            store_rows(dq_ptr, tok0, valid, h, H, K, kb * BK, dq, BK, C)
            store_rows(dk_ptr, tok0, valid, h, H, K, kb * BK, dk, BK, C)
    if L2:
        # The L2 norm's backward, dx = r (dxn - xn <xn, dxn>) with xn = x r, once the row sums cover every
        # K block: each block's dxn read back from where this program wrote it (the barrier orders the
        # program's stores before its loads, whose layouts may differ), the result in the inputs' dtype.
        tl.debug_barrier()
        for kb in tl.range(0, NKB):
            qb = load_rows(q_ptr, tok0, valid, h, H, K, kb * BK, BK, C).to(tl.float32) * rq[:, None]
            kbt = load_rows(k_ptr, tok0, valid, h, H, K, kb * BK, BK, C).to(tl.float32) * rk[:, None]
            dqn = load_rows(dqn_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
            dkn = load_rows(dkn_ptr, tok0, valid, h, H, K, kb * BK, BK, C)
            store_rows(dq_ptr, tok0, valid, h, H, K, kb * BK, rq[:, None] * (dqn - qb * sq[:, None]), BK, C)
            store_rows(dk_ptr, tok0, valid, h, H, K, kb * BK, rk[:, None] * (dkn - kbt * sk[:, None]), BK, C)
    if DELTA:
        tl.store(db_ptr + tok * H + h, dbeta, mask=valid)
    if HAS_G:
        dgam = dc * carry - de * e + dgam_D
        dgam += tl.where(i == C - 1, dcC * c_end + tl.sum(de * e, 0), 0.0)
        dg = tl.sum(dgam, 0) - tl.cumsum(dgam, 0) + dgam
        tl.store(dg_ptr + tok * H + h, dg, mask=valid)
