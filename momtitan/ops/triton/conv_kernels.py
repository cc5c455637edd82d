"""Triton kernels of the segmented causal depthwise short convolution (spec: `ops/conv/naive.py`).

Tokens are a stream `x [total, D]` (a batch is `B*T` tokens; with `cu_seqlens`, B = 1 and the
segment of each token comes from `seg [total]`). Token t of segment n (first token `start`) reads,
for tap s = 0..W-1, the input `x[t-s]` times `weight[:, W-1-s]`, where

    x[t-s]                              if t-s >= start and no reset at t-s+1 .. t
    initial_state[n, :, W-1+t-s-start]  if t-s <  start and no reset at start .. t (zero without one)
    0                                   otherwise.

The final state of segment n is the window the token `end` (one past its last) would read, taps
s = 1..W-1, with the same rule (a zero-length segment hands back its initial state, or zeros).

Kernels (every token tile is [BT, BD], D contiguous; the grid is (T blocks, D blocks, batch)):

1. `conv_fwd_kernel`      y = act(sum_s w_s * tap_s), act = SiLU or identity.
2. `conv_final_kernel`    per (segment, D block): the final window [N, D, W-1].
3. `conv_bwd_da_kernel`   SiLU only: recomputes the pre-activation a and stores da = dy * silu'(a)
                          (fp32); without an activation da is dy itself and this kernel is skipped.
4. `conv_bwd_kernel`      per (T split, D block, batch), looping over the split's T blocks:
                          dx[t] = sum_s w_s * da[t+s] (taps that see x[t]) + d(final state) where
                          x[t] is in a segment's final window; and one fp32 partial of dweight per
                          program, summed over programs by the host (a fixed order: deterministic).
5. `conv_bwd_dh0_kernel`  per (segment, D block): d(initial_state) from the first W-1 tokens'
                          da and from d(final state) of segments shorter than W-1.
6. `conv_step_kernel`     the decode step: per (row, D block) reads the window `state[index[r]]`,
                          writes it back shifted by x (in place), returns act(window . w).

Dtypes: as `segmented.py`, the conv computes in x's dtype (the host rounds the weight and the
initial state to it; the kernels sum in fp32), so y and the final state are in x's dtype.

No host syncs: every launch shape comes from tensor shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momtitan.ops.segments import token_segments, uniform_cu_seqlens
from momtitan.ops.triton.common import pow2

# Tile choices (module level so the interpreter tests can shrink them).
BLOCK_T = 64          # tokens per tile
MAX_BLOCK_D = 64      # channels per tile
BWD_PROGRAMS = 1024   # rough target of conv_bwd_kernel programs: bounds the dweight partials


@triton.jit
def _token_segments(seg_ptr, cu_ptr, b, tok, tmask, T, VARLEN: tl.constexpr):
    """Each token's segment `n`, segment start and segment end (one past its last token)."""
    if VARLEN:
        n = tl.load(seg_ptr + tok, mask=tmask, other=0).to(tl.int64)
        start = tl.load(cu_ptr + n, mask=tmask, other=0).to(tl.int64)
        end = tl.load(cu_ptr + n + 1, mask=tmask, other=0).to(tl.int64)
    else:
        n = tok * 0 + b
        start = n * T
        end = start + T
    return n, start, end


@triton.jit
def _tap(x_ptr, h0_ptr, reset_ptr, tok, n, start, open_, tmask, dd, dmask, D,
         s: tl.constexpr, W: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr):
    """Tap s (>= 1) of the tokens `tok`: the [BT, BD] fp32 values they read from t-s, and the
    updated `open_` (no reset between t-s+1 and t, the tokens' own included)."""
    if HAS_RESET:
        r = tok - s + 1
        rr = tl.load(reset_ptr + r, mask=tmask & (r >= start), other=0)
        open_ = open_ & (rr == 0)
    src = tok - s
    inside = src >= start
    m = (tmask & inside & open_)[:, None] & dmask[None, :]
    val = tl.load(x_ptr + src[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_H0:
        slot = W - 1 + src - start
        mh = (tmask & (src < start) & open_)[:, None] & dmask[None, :]
        val += tl.load(h0_ptr + (n[:, None] * D + dd[None, :]) * (W - 1) + slot[:, None], mask=mh, other=0.0).to(tl.float32)
    return val, open_


@triton.jit
def _weight(w_ptr, dd, dmask, i, W: tl.constexpr):
    return tl.load(w_ptr + dd * W + i, mask=dmask, other=0.0).to(tl.float32)


@triton.jit
def _preact(x_ptr, w_ptr, h0_ptr, reset_ptr, tok, n, start, tmask, dd, dmask, D,
            W: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr):
    """The pre-activation sum_s w[:, W-1-s] * tap_s of the tokens `tok`, [BT, BD] fp32."""
    m = tmask[:, None] & dmask[None, :]
    xt = tl.load(x_ptr + tok[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
    acc = xt * _weight(w_ptr, dd, dmask, W - 1, W)[None, :]
    open_ = tmask
    for s in tl.static_range(1, W):
        val, open_ = _tap(x_ptr, h0_ptr, reset_ptr, tok, n, start, open_, tmask, dd, dmask, D, s, W, HAS_H0, HAS_RESET)
        acc += val * _weight(w_ptr, dd, dmask, W - 1 - s, W)[None, :]
    return acc


@triton.jit
def _tile(T, D, BT: tl.constexpr, BD: tl.constexpr):
    tb = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    t = tb.to(tl.int64) * BT + tl.arange(0, BT)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    return b, t, t < T, b * T + t, dd, dd < D


@triton.jit
def conv_fwd_kernel(
    x_ptr, w_ptr, h0_ptr, reset_ptr, seg_ptr, cu_ptr, y_ptr, T, D,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    VARLEN: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
):
    b, t, tmask, tok, dd, dmask = _tile(T, D, BT, BD)
    n, start, end = _token_segments(seg_ptr, cu_ptr, b, tok, tmask, T, VARLEN)
    a = _preact(x_ptr, w_ptr, h0_ptr, reset_ptr, tok, n, start, tmask, dd, dmask, D, W, HAS_H0, HAS_RESET)
    if SILU:
        a = a * tl.sigmoid(a)
    tl.store(y_ptr + tok[:, None] * D + dd[None, :], a.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


@triton.jit
def conv_final_kernel(
    x_ptr, h0_ptr, reset_ptr, cu_ptr, final_ptr, D,
    W: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    start = tl.load(cu_ptr + n).to(tl.int64)
    end = tl.load(cu_ptr + n + 1).to(tl.int64)
    open_ = tl.full([], 1, tl.int1)
    for s in tl.static_range(1, W):
        if HAS_RESET and s >= 2:  # a reset at end-s+1 (a token of the segment) hides end-s and before
            r = end - s + 1
            rr = tl.load(reset_ptr + r, mask=r >= start, other=0)
            open_ = open_ & (rr == 0)
        src = end - s
        val = tl.load(x_ptr + src * D + dd, mask=dmask & (src >= start) & open_, other=0.0)
        if HAS_H0:
            val += tl.load(h0_ptr + (n * D + dd) * (W - 1) + (W - 1 + src - start), mask=dmask & (src < start) & open_, other=0.0)
        tl.store(final_ptr + (n * D + dd) * (W - 1) + (W - 1 - s), val.to(final_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def conv_bwd_da_kernel(
    x_ptr, w_ptr, h0_ptr, reset_ptr, seg_ptr, cu_ptr, dy_ptr, da_ptr, T, D,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    VARLEN: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
):
    b, t, tmask, tok, dd, dmask = _tile(T, D, BT, BD)
    n, start, end = _token_segments(seg_ptr, cu_ptr, b, tok, tmask, T, VARLEN)
    a = _preact(x_ptr, w_ptr, h0_ptr, reset_ptr, tok, n, start, tmask, dd, dmask, D, W, HAS_H0, HAS_RESET)
    m = tmask[:, None] & dmask[None, :]
    dy = tl.load(dy_ptr + tok[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(da_ptr + tok[:, None] * D + dd[None, :], dy * sig * (1.0 + a * (1.0 - sig)), mask=m)


@triton.jit
def conv_bwd_kernel(
    x_ptr, w_ptr, h0_ptr, reset_ptr, seg_ptr, cu_ptr, da_ptr, dfinal_ptr, dx_ptr, dwp_ptr,
    T, D, span, n_split,
    W: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    VARLEN: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    ts = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    iw = tl.arange(0, BW)
    dw = tl.zeros([BW, BD], dtype=tl.float32)
    t_lo = ts.to(tl.int64) * span
    t_hi = tl.minimum(t_lo + span, T)
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < t_hi
        tok = b * T + t
        n, start, end = _token_segments(seg_ptr, cu_ptr, b, tok, tmask, T, VARLEN)
        m = tmask[:, None] & dmask[None, :]
        da = tl.load(da_ptr + tok[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)

        # dweight: sum over tokens of da * (what tap s read), as in the forward
        xt = tl.load(x_ptr + tok[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
        dw += tl.where(iw[:, None] == W - 1, tl.sum(da * xt, 0)[None, :], 0.0)
        open_ = tmask
        for s in tl.static_range(1, W):
            val, open_ = _tap(x_ptr, h0_ptr, reset_ptr, tok, n, start, open_, tmask, dd, dmask, D, s, W, HAS_H0, HAS_RESET)
            dw += tl.where(iw[:, None] == W - 1 - s, tl.sum(da * val, 0)[None, :], 0.0)

        # dx: x[t] is tap s of token t+s while t+s is in t's segment and no reset at t+1 .. t+s;
        # when t+s is the segment's end, x[t] is slot W-1-s of its final window
        dx = da * _weight(w_ptr, dd, dmask, W - 1, W)[None, :]
        open_ = tmask
        for s in tl.static_range(1, W):
            tk = tok + s
            inside = tk < end
            if HAS_DFINAL:
                mf = (open_ & (tk == end))[:, None] & dmask[None, :]
                dx += tl.load(dfinal_ptr + (n[:, None] * D + dd[None, :]) * (W - 1) + (W - 1 - s), mask=mf, other=0.0).to(tl.float32)
            if HAS_RESET:
                rr = tl.load(reset_ptr + tk, mask=tmask & inside, other=0)
                open_ = open_ & (rr == 0)
            mt = (open_ & inside)[:, None] & dmask[None, :]
            dat = tl.load(da_ptr + tk[:, None] * D + dd[None, :], mask=mt, other=0.0).to(tl.float32)
            dx += dat * _weight(w_ptr, dd, dmask, W - 1 - s, W)[None, :]
        tl.store(dx_ptr + tok[:, None] * D + dd[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)

    p = b * n_split + ts
    tl.store(dwp_ptr + (p * D + dd[None, :]) * W + iw[:, None], dw, mask=(iw < W)[:, None] & dmask[None, :])


@triton.jit
def conv_bwd_dh0_kernel(
    w_ptr, reset_ptr, cu_ptr, da_ptr, dfinal_ptr, dh0_ptr, D,
    W: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    jj = tl.arange(0, BJ)
    jm = jj < W - 1
    start = tl.load(cu_ptr + n).to(tl.int64)
    end = tl.load(cu_ptr + n + 1).to(tl.int64)
    acc = tl.zeros([BJ, BD], dtype=tl.float32)
    open_ = tl.full([], 1, tl.int1)
    # token start+k reads slot j with tap s = W-1-j+k (weight column j-k) for j >= k, unless a
    # reset at start .. start+k hides the cache
    for k in tl.static_range(W - 1):
        tk = start + k
        inside = tk < end
        if HAS_RESET:
            rr = tl.load(reset_ptr + tk, mask=inside, other=0)
            open_ = open_ & (rr == 0)
        dak = tl.load(da_ptr + tk * D + dd, mask=dmask & inside & open_, other=0.0).to(tl.float32)
        wm = (jm & (jj >= k))[:, None] & dmask[None, :]
        wv = tl.load(w_ptr + dd[None, :] * W + (jj - k)[:, None], mask=wm, other=0.0).to(tl.float32)
        acc += wv * dak[None, :]
    if HAS_DFINAL:
        # a segment of L < W-1 tokens without a reset keeps slot j of the cache as final slot j-L
        jf = jj - (end - start)
        mf = (jm & (jf >= 0) & open_)[:, None] & dmask[None, :]
        acc += tl.load(dfinal_ptr + (n * D + dd[None, :]) * (W - 1) + jf[:, None], mask=mf, other=0.0).to(tl.float32)
    tl.store(dh0_ptr + (n * D + dd[None, :]) * (W - 1) + jj[:, None], acc.to(dh0_ptr.dtype.element_ty),
             mask=jm[:, None] & dmask[None, :])


@triton.jit
def conv_step_kernel(
    x_ptr, w_ptr, state_ptr, index_ptr, y_ptr, D,
    W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    row = tl.load(index_ptr + r).to(tl.int64)
    jj = tl.arange(0, BW)
    base = state_ptr + (row * D + dd[:, None]) * (W - 1)
    old = tl.load(base + jj[None, :], mask=dmask[:, None] & (jj < W - 1)[None, :], other=0.0)
    xv = tl.load(x_ptr + r * D + dd, mask=dmask, other=0.0).to(state_ptr.dtype.element_ty)
    window = tl.where((jj == W - 1)[None, :], xv[:, None], old)  # [BD, BW] in the state's dtype
    wv = tl.load(w_ptr + dd[:, None] * W + jj[None, :], mask=dmask[:, None] & (jj < W)[None, :], other=0.0)
    out = tl.sum(window.to(tl.float32) * wv.to(state_ptr.dtype.element_ty).to(tl.float32), 1)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(y_ptr + r * D + dd, out.to(y_ptr.dtype.element_ty), mask=dmask)
    # every thread's reads of the row must land before any thread overwrites it (shifted store)
    tl.debug_barrier()
    tl.store(base + (jj - 1)[None, :], window, mask=dmask[:, None] & ((jj >= 1) & (jj < W))[None, :])


# ------------------------------------------------------------------------------------------ host


class _ConvPlan:
    """Flattened views, segment tables and tiles, from shapes (no host syncs).

    The weight and the initial window are rounded to x's dtype, as the PyTorch path does (the conv
    computes in x's dtype); their gradients go back in their own dtypes.
    """

    def __init__(self, x, weight, initial_state, cu_seqlens, reset):
        B, T, D = x.shape
        self.B, self.T, self.D, self.W = B, T, D, weight.shape[-1]
        self.total = B * T
        self.empty = self.total == 0 or D == 0  # nothing for the per-token kernels to do
        dev = x.device
        self.varlen = cu_seqlens is not None
        self.cu = cu_seqlens.contiguous() if cu_seqlens is not None else uniform_cu_seqlens(B, T, dev)
        self.N = self.cu.numel() - 1
        self.x = x.reshape(self.total, D).contiguous()
        self.w = weight.to(x.dtype).contiguous()
        self.weight_dtype = weight.dtype
        self.h0 = initial_state.to(x.dtype).contiguous() if initial_state is not None else None
        self.state_dtype = initial_state.dtype if initial_state is not None else None
        self.reset = reset.reshape(self.total).contiguous().view(torch.uint8) if reset is not None else None
        self.seg = token_segments(self.cu, self.total) if self.varlen else None
        self.BT = BLOCK_T
        self.BD = min(pow2(D), MAX_BLOCK_D)
        self.ND = triton.cdiv(D, self.BD)
        self.NT = triton.cdiv(T, self.BT)
        self.dummy = torch.empty(1, device=dev, dtype=torch.float32)

    def ptr(self, t):
        """A kernel argument for an optional tensor (a dummy the kernel never reads when absent)."""
        return self.dummy if t is None else t

    def common(self):
        return (self.ptr(self.h0), self.ptr(self.reset), self.ptr(self.seg), self.cu)

    def flags(self):
        return dict(W=self.W, BT=self.BT, BD=self.BD, VARLEN=self.varlen, HAS_H0=self.h0 is not None,
                    HAS_RESET=self.reset is not None)

    def bwd_split(self):
        """`(n_split, span)`: conv_bwd_kernel's T splits, about BWD_PROGRAMS programs in all, each
        `span` tokens (whole T blocks)."""
        n_split = max(1, min(self.NT, triton.cdiv(BWD_PROGRAMS, max(1, self.B * self.ND))))
        span = max(1, triton.cdiv(self.NT, n_split)) * self.BT
        return max(1, triton.cdiv(self.T, span)), span


def conv_forward(p: _ConvPlan, silu: bool, output_final_state: bool):
    """Returns `y [B, T, D]` and `final [N, D, W-1]` or None, both in x's dtype."""
    h0, reset, seg, cu = p.common()
    y = p.x.new_empty(p.B, p.T, p.D)
    if not p.empty:
        conv_fwd_kernel[(p.NT, p.ND, p.B)](p.x, p.w, h0, reset, seg, cu, y, p.T, p.D, SILU=silu, **p.flags())
    if not output_final_state:
        return y, None
    final = p.x.new_empty(p.N, p.D, p.W - 1)
    if p.D > 0:
        conv_final_kernel[(p.N, p.ND)](
            p.x, h0, reset, cu, final, p.D, W=p.W, BD=p.BD, HAS_H0=p.h0 is not None, HAS_RESET=p.reset is not None,
        )
    return y, final


def conv_backward(p: _ConvPlan, silu: bool, dy: torch.Tensor, dfinal: torch.Tensor | None):
    """Returns `(dx [B, T, D] in x's dtype, dweight in weight's dtype, dh0 in initial_state's dtype or None)`."""
    h0, reset, seg, cu = p.common()
    dy = dy.reshape(p.total, p.D).contiguous()
    dfinal = dfinal.contiguous() if dfinal is not None else None
    if p.empty:
        da = p.dummy
    elif silu:
        da = torch.empty(p.total, p.D, device=p.x.device, dtype=torch.float32)
        conv_bwd_da_kernel[(p.NT, p.ND, p.B)](p.x, p.w, h0, reset, seg, cu, dy, da, p.T, p.D, **p.flags())
    else:
        da = dy
    dx = p.x.new_empty(p.B, p.T, p.D)
    n_split, span = p.bwd_split()
    dwp = torch.zeros(p.B * n_split, p.D, p.W, device=p.x.device, dtype=torch.float32)
    if not p.empty:
        conv_bwd_kernel[(n_split, p.ND, p.B)](
            p.x, p.w, h0, reset, seg, cu, da, p.ptr(dfinal), dx, dwp, p.T, p.D, span, n_split,
            BW=pow2(p.W, 2), HAS_DFINAL=dfinal is not None, **p.flags(),
        )
    dw = dwp.sum(0).to(p.weight_dtype)
    if p.h0 is None:
        return dx, dw, None
    dh0 = p.h0.new_empty(p.h0.shape, dtype=p.state_dtype)
    if p.D > 0:
        conv_bwd_dh0_kernel[(p.N, p.ND)](
            p.w, reset, cu, da, p.ptr(dfinal), dh0, p.D,
            W=p.W, BJ=pow2(p.W - 1, 2), BD=p.BD, HAS_RESET=p.reset is not None, HAS_DFINAL=dfinal is not None,
        )
    return dx, dw, dh0


def conv_step(x, weight, state, index, silu: bool):
    """`y [R, D]` in x's dtype; `state[index]` advanced in place."""
    R, D = x.shape
    W = weight.shape[-1]
    y = x.new_empty(R, D)  # contiguous: the kernel writes row r at r * D
    if R == 0 or D == 0:
        return y
    BD = min(pow2(D), MAX_BLOCK_D)
    conv_step_kernel[(R, triton.cdiv(D, BD))](
        x.contiguous(), weight.contiguous(), state, index.contiguous(), y, D, W=W, BW=pow2(W, 2), BD=BD, SILU=silu,
    )
    return y
