"""The chunk map of the padded segment layout (`common.py`'s docstring), built by one Triton program.

`chunk_map` is what the recurrence's plan calls: a single launch, where the plain-PyTorch
`chunk_map_reference` beside it (its definition and its test oracle) takes about twelve small
device ops. The plan is rebuilt by every forward and backward call, and on an H200's host those ops
cost 318 us a call, 40% of the op's host time at B8 T4096 (20th session, `gpu_notes.md`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momtitan.ops.segments import bucket_of_index, padded_num_chunks

BLOCK = 512  # segments or chunks per step of the program's loops


def chunk_map_reference(cu_seqlens: torch.Tensor, total: int, chunk: int):
    """Return `(chunk_info [NC, 2] int64 = (first token, valid tokens), segments [N, 4] int64 =
    (first chunk, end chunk, first token, end token), NC)` of the `N = len(cu_seqlens) - 1` segments."""
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    NC = padded_num_chunks(total, N, chunk)
    lengths = cu[1:] - cu[:-1]
    nch = (lengths + chunk - 1) // chunk
    ch_end = torch.cumsum(nch, 0)
    ch_start = ch_end - nch
    pos = torch.arange(NC, device=cu.device, dtype=torch.int64)
    seg = bucket_of_index(ch_end, NC).clamp(max=N - 1)
    tok0 = cu[seg] + (pos - ch_start[seg]) * chunk
    nvalid = (cu[seg + 1] - tok0).clamp(min=0, max=chunk)
    info = torch.stack([tok0, nvalid], 1).contiguous()
    segments = torch.stack([ch_start, ch_end, cu[:-1], cu[1:]], 1).contiguous()
    return info, segments, NC


def chunk_map(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, chunk: int, device: torch.device):
    """`chunk_map_reference(cu_seqlens, batch * seq_len, chunk)` in one launch on `device`;
    `cu_seqlens=None` means `batch` segments of `seq_len` tokens (no `cu_seqlens` is made for them)."""
    uniform = cu_seqlens is None
    N = batch if uniform else cu_seqlens.shape[0] - 1
    NC = padded_num_chunks(batch * seq_len, N, chunk)
    info = torch.empty(NC, 2, device=device, dtype=torch.int64)
    segments = torch.empty(N, 4, device=device, dtype=torch.int64)
    chunk_map_kernel[(1,)](
        segments if uniform else cu_seqlens, info, segments, N, NC, seq_len, N.bit_length(),
        C=chunk, BLOCK=BLOCK, UNIFORM=uniform,
    )
    return info, segments, NC


@triton.jit
def _bound(cu_ptr, s, mask, seq_len, UNIFORM: tl.constexpr):
    """`cu_seqlens[s]` as int64 (`s * seq_len` for uniform segments)."""
    if UNIFORM:
        return s.to(tl.int64) * seq_len
    return tl.load(cu_ptr + s, mask=mask, other=0).to(tl.int64)


@triton.jit
def chunk_map_kernel(cu_ptr, info_ptr, seg_ptr, N, NC, seq_len, STEPS, C: tl.constexpr, BLOCK: tl.constexpr,
                     UNIFORM: tl.constexpr):
    """One program. First the segments' rows, their chunk ranges a running sum of their chunk counts;
    then each chunk's segment, by a binary search (`STEPS` = bit length of N) for how many segments
    end at or before it, and its first token and valid tokens from that segment's row."""
    carry = tl.full((), 0, tl.int64)
    for base in range(0, N, BLOCK):
        s = base + tl.arange(0, BLOCK)
        m = s < N
        lo = _bound(cu_ptr, s, m, seq_len, UNIFORM)
        hi = _bound(cu_ptr, s + 1, m, seq_len, UNIFORM)
        nch = tl.where(m, (hi - lo + C - 1) // C, 0)
        end = carry + tl.cumsum(nch, 0)
        row = seg_ptr + 4 * s
        tl.store(row, end - nch, mask=m)
        tl.store(row + 1, end, mask=m)
        tl.store(row + 2, lo, mask=m)
        tl.store(row + 3, hi, mask=m)
        carry += tl.sum(nch, 0)
    tl.debug_barrier()  # the rows above are read back by every thread below
    for base in range(0, NC, BLOCK):
        c = base + tl.arange(0, BLOCK)
        first = tl.zeros([BLOCK], dtype=tl.int64)  # the search's range [first, last) of segments
        last = first + N
        for _ in range(STEPS):
            mid = (first + last) // 2
            open_ = first < last
            end = tl.load(seg_ptr + 4 * mid + 1, mask=open_, other=0)
            after = open_ & (end <= c)
            first = tl.where(after, mid + 1, first)
            last = tl.where(open_ & ~after, mid, last)
        row = seg_ptr + 4 * tl.minimum(first, N - 1)  # chunks past the last segment's: its row, no tokens
        tok0 = tl.load(row + 2) + (c - tl.load(row)) * C
        nvalid = tl.minimum(tl.maximum(tl.load(row + 3) - tok0, 0), C)
        m = c < NC
        tl.store(info_ptr + 2 * c, tok0, mask=m)
        tl.store(info_ptr + 2 * c + 1, nvalid, mask=m)
