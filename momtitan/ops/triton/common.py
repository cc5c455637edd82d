"""Shared pieces of the Triton recurrence kernels: in-chunk gates, decay masks, the dot helper, and
the readers of the padded segment layout (see `recurrence/chunk.py`).

Layout. Tokens are a stream `[total, H, *]` (a batch is `B*T` tokens with uniform `cu_seqlens`).
Every segment starts on a chunk boundary of the *padded* chunk axis, whose length is bounded by
`ceil((total + N*(C-1)) / C)` from shapes alone. The chunk map (`chunk_map.py`) gives, per padded
chunk, its first token and its number of valid tokens (0 for the unused tail), and per segment its
chunk and token ranges. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Dot modes: 0 = fp32 operands, 3xTF32 products (about fp32 accuracy, on tensor cores); 1 = bf16 operands; 2 = fp16 operands;
# 3 = fp32 operands, one TF32 product (used where 16-bit operands miscompile, see launch.py).
DOT_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


@triton.jit
def mdot(a, b, DOT_MODE: tl.constexpr):
    """a @ b with fp32 accumulation; operands cast to the mode's dtype."""
    if DOT_MODE == 0:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    elif DOT_MODE == 1:
        r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT_MODE == 2:
        r = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:  # 3: fp32 operands, one TF32 product (10-bit mantissa: as fine as bf16/fp16 operands)
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    return r


@triton.jit
def tile_program(NT: tl.constexpr):
    """`(i, t)`, int64 `i` and `t < NT`, of a launch whose axis 0 runs `i`'s NT tiles side by side
    (`pid = i * NT + t`): the programs that load the same rows of `i` (its chunk's or segment's q, k, W
    tiles, one per V tile) run together and find them in L2. With the tiles on an axis of their own
    each V tile's programs ran after all of the one before it, and every tile read its rows from DRAM
    again (32/128 B8 T4096: `state_kernel` moved 2.15 GB where fla's `fwd_h`, its tiles side by side,
    moved 1.59; Nsight Compute, 21st session)."""
    pid = tl.program_id(0)
    return (pid // NT).to(tl.int64), pid % NT


@triton.jit
def state_program(NVB: tl.constexpr, NKS: tl.constexpr, NKB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  SIDE_BY_SIDE: tl.constexpr):
    """`(n, h, v0, k0)` of a state pass's program: its segment, its head (axis 1), the first column of its
    V tile and the first row of its NKB K blocks, from its tile `t < NVB * NKS` (NKS programs per V
    tile). The tiles sit side by side on axis 0 (`tile_program`), or (not SIDE_BY_SIDE) on axis 2, where
    the pass's programs fit in one wave and have no reuse to gain from neighbours
    (`launch._Plan.state_grid`)."""
    if SIDE_BY_SIDE:
        n, t = tile_program(NVB * NKS)
    else:
        n = tl.program_id(0).to(tl.int64)
        t = tl.program_id(2)
    return n, tl.program_id(1).to(tl.int64), (t // NKS) * BV, (t % NKS) * (NKB * BK)


@triton.jit
def chunk_rows(info_ptr, c, C: tl.constexpr):
    """Chunk `c`'s rows: its first token `tok0`, token ids `tok [C]`, `valid [C]` (the chunk's first
    `nvalid` rows hold tokens), `prow [C]` (its rows in the padded layout), and `nvalid`."""
    tok0 = tl.load(info_ptr + 2 * c)
    nvalid = tl.load(info_ptr + 2 * c + 1)
    i = tl.arange(0, C)
    return tok0, tok0 + i, i < nvalid, c * C + i, nvalid


@triton.jit
def segment_chunk(tok_lo, tok_hi, c, c_first, C: tl.constexpr):
    """Chunk `c` of the segment holding tokens `[tok_lo, tok_hi)` from chunk `c_first` on: its first
    token, its first row in the padded layout and `valid [C]`, computed from those bounds instead of
    loaded from the chunk map, so the sequential passes' loads for the next chunk need no load of
    its map entry first (and can be prefetched)."""
    tok0 = tok_lo + (c - c_first) * C
    return tok0, c * C, tl.arange(0, C) < tok_hi - tok0


# `gates_kernel` writes its per-row values (the log-decay gam, the row weights ke and qc, a copy of
# the reciprocal q / k norms rq and rk) as
# [NC, H, C]: each (chunk, head)'s C rows contiguous, so that a kernel's load of them coalesces. In the
# token layout's order, [NC * C, H], the rows of one head lie H values apart: each load instruction
# of such a vector, broadcast along a dot's output, touched one 32-byte sector per row (the output
# kernel's SASS: 20 scalar loads against 4 scalar and 10 64-bit ones in this layout).

@triton.jit
def gate_rows(c, h, H, C: tl.constexpr):
    """Offset of chunk `c`, head `h`'s first row in a `[NC, H, C]` array of `gates_kernel`."""
    return (c * H + h) * C


@triton.jit
def stored_row_weights(ptr, c, h, H, C: tl.constexpr, live):
    """Chunk `c`'s `[C]` row weights as `gates_kernel` stored them (`ke`, `qc`), zeros where not
    `live`. The sequential passes load them, and `c_end`, a chunk ahead and carry them through the
    loop, so that these small loads are in flight during the previous chunk's dots
    (`docs/kernels.md`, item 9, for what it measured)."""
    i = tl.arange(0, C)
    return tl.load(ptr + gate_rows(c, h, H, C) + i, mask=(i < C) & live, other=0.0)


@triton.jit
def stored_end_decay(cend_ptr, c, h, H, BV: tl.constexpr, NCOPY: tl.constexpr, live):
    """Chunk `c`'s `c_end` as `gates_kernel` stored it, `NCOPY >= BV` copies per (chunk, head) (`[NC, H,
    NCOPY]`), loaded as a `[1, BV]` row to scale a sequential pass's `[BK, BV]` state blocks; 0 where not `live`.
    A scalar load became a uniform register, which ptxas filled (`R2UR`) right after the load: the
    pass waited there for a load it had issued a chunk ahead (`docs/kernels.md`, item 9)."""
    j = tl.arange(0, BV)
    return tl.load(cend_ptr + (c * H + h) * NCOPY + j, mask=(j < BV) & live, other=0.0)[None, :]


# The tile helpers below address a tile as an int64 base pointer plus int32 offsets within it (rows
# of a chunk and columns of a head are < 2^31 apart): int64 offsets per element would double the
# registers every address tile takes.

@triton.jit
def load_rows(ptr, row0, valid, h, H, K, k0, BK: tl.constexpr, C: tl.constexpr):
    """The `[C, BK]` tile of a `[*, H, K]` tensor at rows `row0 .. row0 + C` (tokens or padded rows),
    columns `k0 .. k0 + BK` of head `h`; 0 where `valid` is false or past K."""
    kk = k0 + tl.arange(0, BK)
    i = tl.arange(0, C)
    base = ptr + (row0 * H + h) * K
    return tl.load(base + (i[:, None] * (H * K) + kk[None, :]), mask=valid[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def load_cols(ptr, row0, valid, h, H, K, k0, BK: tl.constexpr, C: tl.constexpr):
    """The transpose of `load_rows`, `[BK, C]`, loaded as such (no `tl.trans` of a tile)."""
    kk = k0 + tl.arange(0, BK)
    i = tl.arange(0, C)
    base = ptr + (row0 * H + h) * K
    return tl.load(base + (i[None, :] * (H * K) + kk[:, None]), mask=valid[None, :] & (kk < K)[:, None], other=0.0)


@triton.jit
def store_rows(ptr, row0, valid, h, H, K, k0, X, BK: tl.constexpr, C: tl.constexpr):
    """Writes `X [C, BK]` where `load_rows` reads, in the tensor's dtype."""
    kk = k0 + tl.arange(0, BK)
    i = tl.arange(0, C)
    base = ptr + (row0 * H + h) * K
    tl.store(base + (i[:, None] * (H * K) + kk[None, :]), X.to(ptr.dtype.element_ty), mask=valid[:, None] & (kk < K)[None, :])


@triton.jit
def load_state(ptr, i, h, H, K, V, k0, vv, BK: tl.constexpr):
    """Rows `k0 .. k0 + BK`, columns `vv` of state `i` of a `[*, H, K, V]` tensor, in fp32 (0 past K, V)."""
    kk = k0 + tl.arange(0, BK)
    m = (kk < K)[:, None] & (vv < V)[None, :]
    base = ptr + (i * H + h) * K * V
    return tl.load(base + (kk[:, None] * V + vv[None, :]), mask=m, other=0.0).to(tl.float32)


@triton.jit
def store_state(ptr, i, h, H, K, V, k0, vv, S, BK: tl.constexpr):
    """Writes `S [BK, BV]` as rows `k0 .. k0 + BK`, columns `vv` of state `i` (`load_state`'s inverse)."""
    kk = k0 + tl.arange(0, BK)
    m = (kk < K)[:, None] & (vv < V)[None, :]
    base = ptr + (i * H + h) * K * V
    tl.store(base + (kk[:, None] * V + vv[None, :]), S.to(ptr.dtype.element_ty), mask=m)


# The sequential passes hold a state's K rows (all of them, or for the rules without beta under
# `state_k_split` a split of them from row k0) as NKB (1, 2 or 4) blocks S1..S4 of [BK, BV], BK <= 64:
# every dot is at most 64 deep. The helpers below take and return all four; blocks past NKB stay zero and are never
# touched (NKB is a compile-time constant, so they cost nothing).

@triton.jit
def segment_bounds(seg_ptr, n):
    """Segment `n`'s (first chunk, end chunk, first token, end token), from the chunk map's table."""
    return tl.load(seg_ptr + 4 * n), tl.load(seg_ptr + 4 * n + 1), tl.load(seg_ptr + 4 * n + 2), tl.load(seg_ptr + 4 * n + 3)


@triton.jit
def load_state_blocks(ptr, i, h, H, K, V, k0, vv, LOAD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      NKB: tl.constexpr):
    """State `i`'s rows from `k0` on as blocks (zeros unless `LOAD`)."""
    S1 = tl.zeros([BK, BV], dtype=tl.float32)
    S2 = tl.zeros([BK, BV], dtype=tl.float32)
    S3 = tl.zeros([BK, BV], dtype=tl.float32)
    S4 = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        S1 = load_state(ptr, i, h, H, K, V, k0, vv, BK)
        if NKB > 1:
            S2 = load_state(ptr, i, h, H, K, V, k0 + BK, vv, BK)
        if NKB > 2:
            S3 = load_state(ptr, i, h, H, K, V, k0 + 2 * BK, vv, BK)
            S4 = load_state(ptr, i, h, H, K, V, k0 + 3 * BK, vv, BK)
    return S1, S2, S3, S4


@triton.jit
def store_state_blocks(ptr, i, h, H, K, V, k0, vv, S1, S2, S3, S4, BK: tl.constexpr, NKB: tl.constexpr):
    store_state(ptr, i, h, H, K, V, k0, vv, S1, BK)
    if NKB > 1:
        store_state(ptr, i, h, H, K, V, k0 + BK, vv, S2, BK)
    if NKB > 2:
        store_state(ptr, i, h, H, K, V, k0 + 2 * BK, vv, S3, BK)
        store_state(ptr, i, h, H, K, V, k0 + 3 * BK, vv, S4, BK)


@triton.jit
def rows_times_blocks(ptr, row0, valid, h, H, K, S1, S2, S3, S4, BK: tl.constexpr, NKB: tl.constexpr,
                      DOT_MODE: tl.constexpr, C: tl.constexpr):
    """`X S`, with X the `[C, K]` rows of a `[*, H, K]` tensor (W, k) and S given as blocks: `[C, BV]`."""
    out = mdot(load_rows(ptr, row0, valid, h, H, K, 0, BK, C), S1, DOT_MODE)
    if NKB > 1:
        out += mdot(load_rows(ptr, row0, valid, h, H, K, BK, BK, C), S2, DOT_MODE)
    if NKB > 2:
        out += mdot(load_rows(ptr, row0, valid, h, H, K, 2 * BK, BK, C), S3, DOT_MODE)
        out += mdot(load_rows(ptr, row0, valid, h, H, K, 3 * BK, BK, C), S4, DOT_MODE)
    return out


@triton.jit
def blocks_plus_cols_times(S1, S2, S3, S4, decay, ptr, row0, valid, h, H, K, k0, Y, BK: tl.constexpr,
                           NKB: tl.constexpr, DOT_MODE: tl.constexpr, C: tl.constexpr):
    """`decay * S + X^T Y` block by block for the state's rows from `k0` on, with X the `[C, K]` rows of
    a `[*, H, K]` tensor, loaded transposed, and `Y [C, BV]`."""
    S1 = decay * S1 + mdot(load_cols(ptr, row0, valid, h, H, K, k0, BK, C), Y, DOT_MODE)
    if NKB > 1:
        S2 = decay * S2 + mdot(load_cols(ptr, row0, valid, h, H, K, k0 + BK, BK, C), Y, DOT_MODE)
    if NKB > 2:
        S3 = decay * S3 + mdot(load_cols(ptr, row0, valid, h, H, K, k0 + 2 * BK, BK, C), Y, DOT_MODE)
        S4 = decay * S4 + mdot(load_cols(ptr, row0, valid, h, H, K, k0 + 3 * BK, BK, C), Y, DOT_MODE)
    return S1, S2, S3, S4


@triton.jit
def row_scales(norm_ptr, tok, valid, h, H, L2: tl.constexpr):
    """Each row's reciprocal L2 norm (q or k) when `L2`, else 1; 0 on rows past the chunk's end."""
    if L2:
        r = tl.load(norm_ptr + tok * H + h, mask=valid, other=0.0)
    else:
        r = tl.where(valid, 1.0, 0.0)
    return r


@triton.jit
def stored_scales(ptr, c, r0, h, H, C: tl.constexpr, N: tl.constexpr, valid, L2: tl.constexpr):
    """`row_scales` of chunk `c`'s rows `r0 .. r0 + N` from the copy `gates_kernel` stored as
    `[NC, H, C]` (`gate_rows`; 0 past the chunk's end) when `L2`, else 1 where `valid`, 0 past it."""
    if L2:
        r = tl.load(ptr + gate_rows(c, h, H, C) + r0 + tl.arange(0, N))
    else:
        r = tl.where(valid, 1.0, 0.0)
    return r


@triton.jit
def chunk_gates(g_ptr, r_ptr, tok, valid, h, H, C: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr):
    """Cumulative log-decay `gamma [C]` from the chunk start and run ids `run [C]` (resets so far)."""
    if HAS_G:
        gamma = tl.cumsum(tl.load(g_ptr + tok * H + h, mask=valid, other=0.0).to(tl.float32), 0)
    else:
        gamma = tl.zeros([C], dtype=tl.float32)
    if HAS_RESET:
        run = tl.cumsum(tl.load(r_ptr + tok, mask=valid, other=0).to(tl.int32), 0)
    else:
        run = tl.zeros([C], dtype=tl.int32)
    return gamma, run


@triton.jit
def stored_gates(gam_ptr, run_ptr, c, r0, h, H, C: tl.constexpr, N: tl.constexpr, HAS_G: tl.constexpr,
                 HAS_RESET: tl.constexpr):
    """`gamma [N]` and `run [N]` of chunk `c`'s rows `r0 .. r0 + N`, as `gates_kernel` stored them
    (loads instead of the cumulative sums `chunk_gates` computes)."""
    i = tl.arange(0, N)
    if HAS_G:
        gamma = tl.load(gam_ptr + gate_rows(c, h, H, C) + r0 + i)
    else:
        gamma = tl.zeros([N], dtype=tl.float32)
    if HAS_RESET:
        run = tl.load(run_ptr + c * C + r0 + i)
    else:
        run = tl.zeros([N], dtype=tl.int32)
    return gamma, run


@triton.jit
def stored_weights(gam_ptr, run_ptr, c, h, H, gamma, run, C: tl.constexpr, HAS_G: tl.constexpr,
                   HAS_RESET: tl.constexpr):
    """`chunk_weights` from chunk `c`'s stored gates: its last row read as a scalar, not reduced."""
    g_last = 0.0
    r_last = 0
    if HAS_G:
        g_last = tl.load(gam_ptr + gate_rows(c, h, H, C) + C - 1)
    if HAS_RESET:
        r_last = tl.load(run_ptr + c * C + C - 1)
    return weights_from_last(gamma, run, g_last, r_last)


@triton.jit
def stored_decay(gam_ptr, run_ptr, c, h, H, C: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    """The chunk's decay matrix D[i, j] = exp(gamma_i - gamma_j) for j <= i in the same run, else 0, or
    (TRANSPOSED) its transpose, built directly (transposing a tensor that comes out of a `tl.dot` and
    feeding it to another dot miscompiles on Hopper with Triton 3.4-3.6 for 16-bit operands: the
    kernels never `tl.trans` a dot result). The stored gates are loaded once as a column [C, 1] and
    once as a row [1, C], so that no vector changes layout to broadcast."""
    i = tl.arange(0, C)
    if TRANSPOSED:
        m = i[:, None] <= i[None, :]
    else:
        m = i[:, None] >= i[None, :]
    if HAS_RESET:
        m = m & (tl.load(run_ptr + c * C + i[:, None]) == tl.load(run_ptr + c * C + i[None, :]))
    if HAS_G:
        g_col = tl.load(gam_ptr + gate_rows(c, h, H, C) + i[:, None])
        g_row = tl.load(gam_ptr + gate_rows(c, h, H, C) + i[None, :])
        diff = g_row - g_col if TRANSPOSED else g_col - g_row
        d = tl.where(m, tl.exp(tl.where(m, diff, 0.0)), 0.0)
    else:
        d = tl.where(m, 1.0, 0.0)
    return d


@triton.jit
def chunk_weights(gamma, run, C: tl.constexpr):
    """carry [C] (weight of the chunk's start state at each token), end weights e [C] (weight of each
    token's update in the chunk's end state), c_end (weight of the start state in the end state)."""
    i = tl.arange(0, C)
    g_last = tl.sum(tl.where(i == C - 1, gamma, 0.0), 0)
    r_last = tl.sum(tl.where(i == C - 1, run, 0), 0)
    return weights_from_last(gamma, run, g_last, r_last)


@triton.jit
def start_weights(gamma, run):
    """carry: each row's weight of the chunk's start state (0 after a reset in the chunk)."""
    return tl.where(run == 0, tl.exp(gamma), 0.0)


@triton.jit
def weights_from_last(gamma, run, g_last, r_last):
    """`chunk_weights` given the chunk's last row's log-decay `g_last` and run id `r_last`."""
    e = tl.where(run == r_last, tl.exp(g_last - gamma), 0.0)
    c_end = tl.where(r_last == 0, tl.exp(g_last), 0.0)
    return start_weights(gamma, run), e, c_end


@triton.jit
def unit_lower_inverse(A, C: tl.constexpr):
    """(I + A)^-1 for strictly lower-triangular A [C, C], by forward substitution in registers."""
    i = tl.arange(0, C)
    T = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    for r in range(1, C):
        a_r = tl.sum(tl.where(i[:, None] == r, A, 0.0), 0)
        new = tl.sum(a_r[:, None] * T, 0)
        T = tl.where(i[:, None] == r, T - new[None, :], T)
    return T


@triton.jit
def inverse_blocks(A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, NB: tl.constexpr, BS: tl.constexpr):
    """(I + A)^-1 of a strictly lower-triangular A given as its NB x NB grid of BS x BS blocks (NB = 1,
    2 or 4; the blocks outside the grid are passed and returned unused). The diagonal blocks by forward
    substitution (BS - 1 short steps each), then row block by row block
    X_rc = -X_rr (sum over c <= m < r of A_rm X_mc), with fp32 (3xTF32) dots."""
    X00 = unit_lower_inverse(A00, BS)
    X10, X11, X20, X21, X22, X30, X31, X32, X33 = A10, A11, A20, A21, A22, A30, A31, A32, A33
    if NB >= 2:
        X11 = unit_lower_inverse(A11, BS)
        X10 = -mdot(X11, mdot(A10, X00, 0), 0)
    if NB >= 4:
        X22 = unit_lower_inverse(A22, BS)
        X33 = unit_lower_inverse(A33, BS)
        X21 = -mdot(X22, mdot(A21, X11, 0), 0)
        X20 = -mdot(X22, mdot(A20, X00, 0) + mdot(A21, X10, 0), 0)
        X32 = -mdot(X33, mdot(A32, X22, 0), 0)
        X31 = -mdot(X33, mdot(A31, X11, 0) + mdot(A32, X21, 0), 0)
        X30 = -mdot(X33, mdot(A30, X00, 0) + mdot(A31, X10, 0) + mdot(A32, X20, 0), 0)
    return X00, X10, X11, X20, X21, X22, X30, X31, X32, X33

