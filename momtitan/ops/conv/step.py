"""One decoding step of the short convolution on the rows of a conv-state table picked by an index."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momtitan.checks import autograd_records, require_same_device


def short_conv_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, index: torch.Tensor,
                    activation: str | None = "silu") -> torch.Tensor:
    """`x [R, D]`, `weight [D, W]`, `state [S, D, W-1]` updated in place at rows `index [R]` (distinct).

    On CUDA (contiguous state, no autograd recording, fp32/bf16/fp16) one fused Triton kernel
    reads and writes the indexed rows in place; the window and weights are rounded to the state's
    dtype as here, and the sum runs in fp32. Shapes, dtypes and devices are checked; `index` must
    hold distinct rows in `[0, S)`, which is not checked (that would need a host sync per step).
    """
    check_conv_step_inputs(x, weight, state, index, activation)
    return _short_conv_step(x, weight, state, index, activation)


def _short_conv_step(x, weight, state, index, activation="silu"):
    """`short_conv_step` without the argument checks: for the MoM layer's decode step, which builds
    its arguments itself."""
    if state.is_cuda and state.is_contiguous() and not autograd_records(x, weight, state):
        from momtitan.ops.triton import supports_conv, triton_short_conv_step

        if supports_conv(x, weight, state):
            return triton_short_conv_step(x, weight, state, index, activation)
    window = torch.cat([state.index_select(0, index), x.to(state.dtype)[:, :, None]], dim=-1)  # [R, D, W]
    state.index_copy_(0, index, window[..., 1:])
    out = (window * weight.to(state.dtype)).sum(-1)
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)


def check_conv_step_inputs(x, weight, state, index, activation) -> None:
    """Shape, dtype and device checks of `short_conv_step` (no host syncs)."""
    for name, t, dims, what in (("x", x, 2, "[R, D]"), ("weight", weight, 2, "[D, W]"), ("state", state, 3, "[S, D, W-1]"),
                                ("index", index, 1, "[R]")):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {what} tensor, got {getattr(t, 'shape', type(t).__name__)}")
    R, D = x.shape
    if weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"weight must be [D = {D}, W >= 1], got {tuple(weight.shape)}")
    if state.shape[1:] != (D, weight.shape[1] - 1):
        raise ValueError(f"state must be [S, D, W-1] with D, W-1 = {D}, {weight.shape[1] - 1}, got {tuple(state.shape)}")
    if index.shape != (R,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an int32/int64 [R = {R}] tensor, got {index.dtype} {tuple(index.shape)}")
    for name, t in (("x", x), ("weight", weight), ("state", state)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    require_same_device("state", state, x=x, weight=weight, index=index)
