"""One decoding step of the short convolution on the rows of a conv-state table picked by an index."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, index: torch.Tensor,
                    activation: str | None = "silu") -> torch.Tensor:
    """`x [R, D]`, `weight [D, W]`, `state [S, D, W-1]` updated in place at rows `index [R]`."""
    window = torch.cat([state.index_select(0, index), x.to(state.dtype)[:, :, None]], dim=-1)  # [R, D, W]
    state.index_copy_(0, index, window[..., 1:])
    out = (window * weight.to(state.dtype)).sum(-1)
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)
