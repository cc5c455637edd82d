"""`linear_recurrence`: one primitive for every memory rule.

    g     beta   rule
    None  None   linear attention
    given None   scalar-gated (RetNet / Mamba2 / simple GLA)
    None  given  delta rule (DeltaNet)
    given given  gated delta rule (Gated DeltaNet)

`naive.py` is the token-by-token specification, `chunk.py` the chunked PyTorch implementation,
`step.py` the single-token update used for decoding.
"""

from __future__ import annotations

import torch

from momtitan.checks import require_optional_float, require_same_device
from momtitan.ops.recurrence.chunk import chunk_linear_recurrence
from momtitan.ops.recurrence.naive import naive_linear_recurrence
from momtitan.ops.recurrence.step import _linear_recurrence_step, linear_recurrence_step
from momtitan.ops.segments import validate_cu_seqlens

__all__ = ["linear_recurrence", "linear_recurrence_step", "chunk_linear_recurrence", "naive_linear_recurrence"]


def _shape(name, x, expected_dims, what):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != expected_dims:
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")


def _check_float(name, x):
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_recurrence_inputs(q, k, v, g, beta, initial_state, cu_seqlens, reset, scale) -> None:
    """Shape and dtype checks, free of host syncs (they read only shapes and dtypes)."""
    _shape("q", q, 4, "[B, T, H, K]")
    _shape("k", k, 4, "[B, T, H, K]")
    _shape("v", v, 4, "[B, T, H, V]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, T, H, K = q.shape
    if K == 0 or v.shape[-1] == 0:
        raise ValueError(f"the head dims K and V must be >= 1, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x is None:
            continue
        _shape(name, x, 3, "[B, T, H]")
        _check_float(name, x)
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(x.shape)}")
    if reset is not None:
        _shape("reset", reset, 2, "[B, T]")
        if reset.dtype != torch.bool or reset.shape != q.shape[:2]:
            raise ValueError(f"reset must be a bool tensor of shape {tuple(q.shape[:2])}, got {reset.dtype} {tuple(reset.shape)}")
    if cu_seqlens is not None:
        _shape("cu_seqlens", cu_seqlens, 1, "[N+1]")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got q of shape {tuple(q.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must hold N+1 >= 2 offsets, got {cu_seqlens.numel()}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (N, H, K, v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state must be [N, H, K, V] = {expected}, got {got}")
        _check_float("initial_state", initial_state)
    require_optional_float("scale", scale)
    require_same_device("q", q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens, reset=reset)


def linear_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the linear recurrence over `[B, T, H, *]` inputs and return `(o, final_state)`.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, H, V]`.
        g: log-decay (<= 0), `[B, T, H]`, or None for no decay.
        beta: delta-rule step size, `[B, T, H]`, or None for the plain outer-product update.
        scale: output scale, default `K ** -0.5`.
        initial_state: `[N, H, K, V]` per sequence (N = B, or the number of packed sequences).
        output_final_state: also return the `[N, H, K, V]` state after each sequence (fp32; fp64
            for fp64 inputs). A zero-length sequence returns its initial state unchanged.
        cu_seqlens: `[N+1]` offsets of N packed sequences in a `B = 1` input; empty ones allowed.
        reset: `[B, T]` bool; the state is zeroed right before each flagged token (a document
            boundary inside a sequence; it also discards the initial state).
        qk_l2norm: L2-normalise q and k over K first.

    Returns `o` in the dtype of v, and the final states (or None).
    """
    check_recurrence_inputs(q, k, v, g, beta, initial_state, cu_seqlens, reset, scale)
    if cu_seqlens is not None and not torch.compiler.is_compiling():
        validate_cu_seqlens(cu_seqlens, q.shape[1])
    return _linear_recurrence(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, reset=reset, qk_l2norm=qk_l2norm,
    )


def _linear_recurrence(q, k, v, g, beta, *, varying_rows: bool = False, **kwargs):
    """Dispatch without the host-side value checks; for callers that build `cu_seqlens` themselves.

    CUDA inputs that the Triton kernels support (`momtitan.ops.triton.supports`, imported lazily) go
    to them, everything else to the chunked PyTorch path. `varying_rows`: the row count
    changes from call to call (expert parallelism's received rows), a dynamic size under
    torch.compile. The Triton ops take it as it comes; the chunked path carries the state in a
    Python loop over chunks, which would recompile for every chunk count, so it then runs between
    compiled graphs instead.
    """
    if q.is_cuda:
        from momtitan.ops.triton import supports, triton_linear_recurrence

        if supports(q, v):
            return triton_linear_recurrence(q, k, v, g, beta, **kwargs)
    if varying_rows:
        return _chunked_between_graphs(q, k, v, g, beta, **kwargs)
    return chunk_linear_recurrence(q, k, v, g, beta, **kwargs)


_chunked_between_graphs = torch.compiler.disable(chunk_linear_recurrence)
