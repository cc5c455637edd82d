"""The segmented causal short convolution in plain PyTorch: W shifted reads, no loop over tokens.

Token t reads `x[t-s]` for `s < W` when that token is in t's run (same segment, no reset between);
when the run began at the segment start, reads from before it come from the segment's
`initial_state` (the conv cache); otherwise they are zero. Shapes depend on T, N and W only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momtitan.ops.segments import run_starts, uniform_cu_seqlens


def segmented_short_conv(x, weight, *, cu_seqlens=None, reset=None, initial_state=None, output_final_state=False,
                         activation="silu"):
    B, T, D = x.shape
    W = weight.shape[-1]
    weight = weight.to(x.dtype)  # computes in x's dtype, as autocast would (fp32 weights under bf16 autocast)
    total = B * T
    cu = uniform_cu_seqlens(B, T, x.device) if cu_seqlens is None else cu_seqlens.long()
    N = cu.numel() - 1
    flat = x.reshape(total, D)
    seg, seg_start, run_start, hard = run_starts(cu, None if reset is None else reset.reshape(total), total)
    positions = torch.arange(total, device=x.device)
    cache = None
    if initial_state is not None:
        cache = initial_state.to(x.dtype).transpose(1, 2)  # [N, W-1, D]

    out = flat * weight[:, W - 1]
    for s in range(1, W):
        src = positions - s
        inside = src >= run_start
        value = torch.where(inside[:, None], flat[src.clamp(min=0)], 0.0)
        if cache is not None:
            slot = W - 1 + src - seg_start  # position in the cache window when src precedes the segment
            from_cache = ~inside & ~hard & (slot >= 0)
            value = torch.where(from_cache[:, None], cache[seg, slot.clamp(min=0, max=W - 2)], value)
        out = out + value * weight[:, W - 1 - s]
    y = (F.silu(out) if activation == "silu" else out).reshape(B, T, D)

    final_state = None
    if output_final_state:
        old = cache if cache is not None else flat.new_zeros(N, W - 1, D)
        if total == 0:  # no tokens: every segment is empty and hands back its initial window
            return y, old.transpose(1, 2).contiguous()
        lengths = cu[1:] - cu[:-1]
        last = (cu[1:] - 1).clamp(min=0)
        src = cu[1:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
        inside = src >= run_start[last][:, None]
        window = torch.where(inside[..., None], flat[src.clamp(min=0)], 0.0)
        slot = W - 1 + src - cu[:-1, None]
        from_cache = ~inside & ~hard[last][:, None] & (slot >= 0)
        window = torch.where(from_cache[..., None], old[torch.arange(N, device=x.device)[:, None], slot.clamp(min=0, max=W - 2)], window)
        window = torch.where((lengths > 0)[:, None, None], window, old)
        final_state = window.transpose(1, 2).contiguous()
    return y, final_state
