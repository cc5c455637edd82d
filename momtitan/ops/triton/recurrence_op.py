"""torch.library registration of the Triton linear recurrence.

`momtitan::linear_recurrence_fwd` and `momtitan::linear_recurrence_bwd` are opaque custom ops
(they compile with `torch.compile(fullgraph=True)` whatever runs inside), with fake kernels for
tracing; autograd of the forward op calls the backward op. The forward op returns, besides the
output and the final state, the intermediates its backward keeps, as fla's kernels keep theirs:
the delta rules' `T = (I + A)^-1` ([NC, H, C, C], the inputs' dtype) and, with `qk_l2norm`, the
rows' reciprocal norms (`[B*T, H]` fp32 each); the backward recomputes the rest (the chunk states,
W and u). Absent tensors are empty inside the ops and None from autograd.
`triton_linear_recurrence` is the `linear_recurrence`-shaped entry point.
"""

from __future__ import annotations

import torch

from momtitan.ops.segments import padded_num_chunks
from momtitan.ops.triton.launch import DEFAULT_CHUNK, _Plan, backward, forward

_EMPTY = (0,)


def _num_segments(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("momtitan::linear_recurrence_fwd", mutates_args=())
def linear_recurrence_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, reset: torch.Tensor | None,
    scale: float, qk_l2norm: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns `(o, final_state, T, rq, rk)`; the last three are for the backward op (empty where
    the rule has no `T` or `qk_l2norm` is off)."""
    p = _Plan(q, k, v, g, beta, initial_state, cu_seqlens, reset, qk_l2norm, chunk_size)
    o, ht, *kept = forward(p, scale)
    return o, ht, *(q.new_empty(_EMPTY) if x is None else x for x in kept)  # distinct empties: outputs may not alias


@linear_recurrence_fwd.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size):
    B, T, H, K = q.shape
    N = _num_segments(q, cu_seqlens)
    NC = padded_num_chunks(B * T, N, chunk_size)
    t = q.new_empty(NC, H, chunk_size, chunk_size) if beta is not None else q.new_empty(_EMPTY)
    norms = [q.new_empty(B * T, H, dtype=torch.float32) if qk_l2norm else q.new_empty(_EMPTY) for _ in range(2)]
    return v.new_empty(v.shape), q.new_empty(N, H, K, v.shape[3], dtype=torch.float32), t, *norms


@torch.library.custom_op("momtitan::linear_recurrence_bwd", mutates_args=())
def linear_recurrence_bwd(
    do: torch.Tensor, dht: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, reset: torch.Tensor | None,
    scale: float, qk_l2norm: bool, chunk_size: int,
    T: torch.Tensor | None, rq: torch.Tensor | None, rk: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients; `T`, `rq`, `rk` are the forward op's (required where it returned them)."""
    _check_kept(q, beta, qk_l2norm, T, rq, rk)
    norms = (rq, rk) if qk_l2norm else None
    p = _Plan(q, k, v, g, beta, initial_state, cu_seqlens, reset, qk_l2norm, chunk_size, norms=norms)
    dq, dk, dv, dg, db, dh0 = backward(p, scale, do, dht, T)
    dg = dg.to(g.dtype) if g is not None else q.new_empty(_EMPTY)
    db = db.to(beta.dtype) if beta is not None else q.new_empty(_EMPTY)
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else q.new_empty(_EMPTY, dtype=torch.float32)
    return dq, dk, dv, dg, db, dh0


def _check_kept(q, beta, qk_l2norm, T, rq, rk) -> None:
    """The backward op reads the forward's `T` (delta rules) and row norms (`qk_l2norm`) instead of
    computing them: each must be there exactly when the forward returned it."""
    if (T is None) != (beta is None):
        raise ValueError(f"linear_recurrence_bwd takes the forward's T exactly when beta is given; got beta "
                         f"{'None' if beta is None else 'given'} and T {None if T is None else tuple(T.shape)}")
    if qk_l2norm and (rq is None or rk is None):
        raise ValueError(f"linear_recurrence_bwd with qk_l2norm=True takes the forward's rq and rk, got "
                         f"rq {None if rq is None else tuple(rq.shape)}, rk {None if rk is None else tuple(rk.shape)}")


@linear_recurrence_bwd.register_fake
def _(do, dht, q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size, T, rq, rk):
    _check_kept(q, beta, qk_l2norm, T, rq, rk)
    dg = g.new_empty(g.shape) if g is not None else q.new_empty(_EMPTY)
    db = beta.new_empty(beta.shape) if beta is not None else q.new_empty(_EMPTY)
    dh0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else q.new_empty(_EMPTY, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dg, db, dh0


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size = inputs
    _, _, T, rq, rk = output
    ctx.mark_non_differentiable(T, rq, rk)
    if beta is None:  # the empty placeholders go to the backward op as None
        T = None
    if not qk_l2norm:
        rq = rk = None
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, reset, T, rq, rk)
    ctx.scale, ctx.qk_l2norm, ctx.chunk_size = scale, qk_l2norm, chunk_size


def _backward(ctx, do, dht, *_):
    q, k, v, g, beta, initial_state, cu_seqlens, reset, T, rq, rk = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, db, dh0 = linear_recurrence_bwd(
        do, dht, q, k, v, g, beta, initial_state, cu_seqlens, reset, ctx.scale, ctx.qk_l2norm, ctx.chunk_size,
        T, rq, rk,
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
    o, ht, *_ = linear_recurrence_fwd(q, k, v, g, beta, initial_state, cu_seqlens, reset, scale, qk_l2norm, chunk_size)
    return o, (ht if output_final_state else None)
