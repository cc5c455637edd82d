"""`short_conv`: the depthwise causal convolution (kernel W, SiLU) along segmented token streams.

`naive.py` is the token-by-token specification, `segmented.py` the PyTorch implementation,
`step.py` the single-token update used for decoding. CUDA tensors take the Triton kernels of
`momtitan.ops.triton` (`conv_kernels.py`) for both, unless `MOMTITAN_TRITON=0`.
"""

from __future__ import annotations

import torch

from momtitan.checks import require_same_device
from momtitan.ops.conv.naive import naive_short_conv
from momtitan.ops.conv.segmented import segmented_short_conv
from momtitan.ops.conv.step import _short_conv_step, short_conv_step
from momtitan.ops.segments import validate_cu_seqlens

__all__ = ["short_conv", "short_conv_step", "naive_short_conv", "segmented_short_conv"]


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv of `x [B, T, D]` with `weight [D, W]` (last tap = current token).

    `cu_seqlens`, `reset` and `initial_state [N, D, W-1]` (the last W-1 inputs, oldest first) have
    the meaning they have in `linear_recurrence`. Returns `(y, final_state)`, `y` in x's dtype (the
    weight is cast to it: under bf16 autocast, fp32 weights must not turn the activations fp32).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, T, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [D={x.shape[-1]}, W], got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.shape[1] < 1:
        raise ValueError(f"weight must have W >= 1 taps, got shape {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    for name, t in (("cu_seqlens", cu_seqlens), ("reset", reset), ("initial_state", initial_state)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    require_same_device("x", x, weight=weight, cu_seqlens=cu_seqlens, reset=reset, initial_state=initial_state)
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1, got x of shape {tuple(x.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a [N+1] tensor with N >= 1, got shape {tuple(cu_seqlens.shape)}")
        if not torch.compiler.is_compiling():
            validate_cu_seqlens(cu_seqlens, x.shape[1])
    if reset is not None and (reset.dtype != torch.bool or reset.shape != x.shape[:2]):
        raise ValueError(f"reset must be a bool tensor of shape {tuple(x.shape[:2])}, got {reset.dtype} {tuple(reset.shape)}")
    N = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    expected = (N, x.shape[-1], weight.shape[-1] - 1)
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be [N, D, W-1] = {expected}, got {tuple(initial_state.shape)}")
    return _short_conv(x, weight, cu_seqlens=cu_seqlens, reset=reset, initial_state=initial_state,
                       output_final_state=output_final_state, activation=activation)


def _short_conv(x, weight, **kwargs):
    """Dispatch without the host-side value checks; for callers that build `cu_seqlens` themselves.

    CUDA inputs in fp32/bf16/fp16 go to the Triton kernels (`momtitan.ops.triton`, imported lazily)
    unless `MOMTITAN_TRITON=0`; everything else to the PyTorch path, which stays the reference.
    """
    if x.is_cuda:
        from momtitan.ops.triton import supports_conv, triton_short_conv

        if supports_conv(x, weight, kwargs.get("initial_state")):
            return triton_short_conv(x, weight, **kwargs)
    return segmented_short_conv(x, weight, **kwargs)
