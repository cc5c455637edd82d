"""One decoding step of the short convolution on the rows of a conv-state table picked by an index."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, index: torch.Tensor,
                    activation: str | None = "silu") -> torch.Tensor:
    """`x [R, D]`, `weight [D, W]`, `state [S, D, W-1]` updated in place at rows `index [R]` (distinct).

    On CUDA (contiguous state, no autograd recording, fp32/bf16/fp16) one fused Triton kernel
    reads and writes the indexed rows in place; the window and weights are rounded to the state's
    dtype as here, and the sum runs in fp32.
    """
    if state.is_cuda and state.is_contiguous() and not _needs_grad(x, weight, state):
        from momtitan.ops.triton import supports_conv, triton_short_conv_step

        if supports_conv(x, weight, state):
            return triton_short_conv_step(x, weight, state, index, activation)
    window = torch.cat([state.index_select(0, index), x.to(state.dtype)[:, :, None]], dim=-1)  # [R, D, W]
    state.index_copy_(0, index, window[..., 1:])
    out = (window * weight.to(state.dtype)).sum(-1)
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)


def _needs_grad(*tensors) -> bool:
    """The fused step kernel has no backward: keep the PyTorch path when autograd is recording."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
