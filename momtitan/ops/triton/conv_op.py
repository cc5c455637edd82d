"""torch.library registration of the Triton short convolution (kernels: `conv_kernels.py`).

`momtitan::short_conv_fwd` and `momtitan::short_conv_bwd` are opaque custom ops with fake kernels
and autograd (the forward's autograd calls the backward op, which recomputes the pre-activation);
`momtitan::short_conv_step` is the decode step, which mutates its state table. An absent final
state or initial-state gradient comes back from the ops as an empty tensor and from autograd as
None. `triton_short_conv` / `triton_short_conv_step` are the `short_conv` / `short_conv_step`-shaped
entry points.
"""

from __future__ import annotations

import torch

from momtitan.ops.triton.conv_kernels import _ConvPlan, conv_backward, conv_forward, conv_step


def _or_empty(t, like):
    """An absent output as the ops return it: an empty tensor (a custom op cannot return None)."""
    return like.new_empty((0,)) if t is None else t


@torch.library.custom_op("momtitan::short_conv_fwd", mutates_args=())
def short_conv_fwd(
    x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    reset: torch.Tensor | None, silu: bool, output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, final = conv_forward(_ConvPlan(x, weight, initial_state, cu_seqlens, reset), silu, output_final_state)
    return y, _or_empty(final, x)


@short_conv_fwd.register_fake
def _(x, weight, initial_state, cu_seqlens, reset, silu, output_final_state):
    final = None
    if output_final_state:
        N = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        final = x.new_empty(N, x.shape[-1], weight.shape[-1] - 1)
    return x.new_empty(x.shape), _or_empty(final, x)


@torch.library.custom_op("momtitan::short_conv_bwd", mutates_args=())
def short_conv_bwd(
    dy: torch.Tensor, dfinal: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, reset: torch.Tensor | None, silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, dh0 = conv_backward(_ConvPlan(x, weight, initial_state, cu_seqlens, reset), silu, dy, dfinal)
    return dx, dw, _or_empty(dh0, x)


@short_conv_bwd.register_fake
def _(dy, dfinal, x, weight, initial_state, cu_seqlens, reset, silu):
    dh0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else None
    return x.new_empty(x.shape), weight.new_empty(weight.shape), _or_empty(dh0, x)


def _setup_context(ctx, inputs, output):
    x, weight, initial_state, cu_seqlens, reset, silu, output_final_state = inputs
    ctx.save_for_backward(x, weight, initial_state, cu_seqlens, reset)
    ctx.silu, ctx.output_final_state = silu, output_final_state


def _backward(ctx, dy, dfinal):
    x, weight, initial_state, cu_seqlens, reset = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros(x.shape)  # y is in x's dtype
    if not ctx.output_final_state:
        dfinal = None
    dx, dw, dh0 = short_conv_bwd(dy, dfinal, x, weight, initial_state, cu_seqlens, reset, ctx.silu)
    return dx, dw, (dh0 if initial_state is not None else None), None, None, None, None


short_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("momtitan::short_conv_step", mutates_args=("state",))
def short_conv_step_op(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, index: torch.Tensor, silu: bool,
) -> torch.Tensor:
    if not state.is_contiguous():
        raise ValueError("the Triton conv step needs a contiguous state table")
    return conv_step(x, weight, state, index, silu)


@short_conv_step_op.register_fake
def _(x, weight, state, index, silu):
    return x.new_empty(x.shape)


def triton_short_conv(x, weight, *, cu_seqlens=None, reset=None, initial_state=None, output_final_state=False,
                      activation="silu"):
    """`short_conv` on the Triton kernels (same arguments and results, y in x's dtype; no value checks)."""
    y, final = short_conv_fwd(x, weight, initial_state, cu_seqlens, reset, activation == "silu", output_final_state)
    return y, (final if output_final_state else None)


def triton_short_conv_step(x, weight, state, index, activation="silu"):
    """`short_conv_step` on the fused kernel: `state[index]` updated in place."""
    return short_conv_step_op(x, weight, state, index, activation == "silu")
