"""torch.library registration of the Triton linear recurrence.

`momtitan::linear_recurrence_fwd` and `momtitan::linear_recurrence_bwd` are opaque custom ops
(they compile with `torch.compile(fullgraph=True)` whatever runs inside), with fake kernels for
tracing; autograd of the forward op calls the backward op, which recomputes the forward's
intermediates. Absent optional gradients come back as empty tensors inside the ops and as None
from autograd. `triton_linear_recurrence` is the `linear_recurrence`-shaped entry point.
"""

from __future__ import annotations

import torch

from momtitan.ops.triton.launch import DEFAULT_CHUNK, _Plan, backward, forward

_EMPTY = (0,)


def _num_segments(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("momtitan::linear_recurrence_fwd", mutates_args=())
def linear_recurrence_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, reset: torch.Tensor | None,
    scale: float, qk_l2norm: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _Plan(q, k, v, g, beta, initial_state, cu_seqlens, reset, qk_l2norm, chunk_size)
    o, ht = forward(p, scale)
    return o, ht


@linear_recurrence_fwd.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size):
    N = _num_segments(q, cu_seqlens)
    return v.new_empty(v.shape), q.new_empty(N, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)


@torch.library.custom_op("momtitan::linear_recurrence_bwd", mutates_args=())
def linear_recurrence_bwd(
    do: torch.Tensor, dht: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, reset: torch.Tensor | None,
    scale: float, qk_l2norm: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _Plan(q, k, v, g, beta, initial_state, cu_seqlens, reset, qk_l2norm, chunk_size)
    dq, dk, dv, dg, db, dh0 = backward(p, scale, do, dht)
    dg = dg.to(g.dtype) if g is not None else q.new_empty(_EMPTY)
    db = db.to(beta.dtype) if beta is not None else q.new_empty(_EMPTY)
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else q.new_empty(_EMPTY, dtype=torch.float32)
    return dq, dk, dv, dg, db, dh0


@linear_recurrence_bwd.register_fake
def _(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size):
    dg = g.new_empty(g.shape) if g is not None else q.new_empty(_EMPTY)
    db = beta.new_empty(beta.shape) if beta is not None else q.new_empty(_EMPTY)
    dh0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else q.new_empty(_EMPTY, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dg, db, dh0


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, reset)
    ctx.scale, ctx.qk_l2norm, ctx.chunk_size = scale, qk_l2norm, chunk_size


def _backward(ctx, do, dht):
    q, k, v, g, beta, initial_state, cu_seqlens, reset = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, db, dh0 = linear_recurrence_bwd(
        do, dht, q, k, v, g, beta, initial_state, cu_seqlens, reset, ctx.scale, ctx.qk_l2norm, ctx.chunk_size
    )
    return (
        dq, dk, dv,
        dg if g is not None else None,
        db if beta is not None else None,
        dh0 if initial_state is not None else None,
        None, None, None, None, None,
    )


linear_recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_linear_recurrence(
    q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, reset=None, qk_l2norm=False, chunk_size=DEFAULT_CHUNK,
):
    """`linear_recurrence` on the Triton kernels (same arguments and results; `chunk_size` 16, 32 or 64)."""
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64 for the Triton kernels, got {chunk_size!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht = linear_recurrence_fwd(q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size)
    return o, (ht if output_final_state else None)
