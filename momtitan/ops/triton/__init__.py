"""Triton kernels for `linear_recurrence` (chunked forward and backward) and its decode step, and
for `short_conv` (forward, backward, decode step), registered as `torch.library` custom ops in the
`momtitan` namespace. Importing this package imports triton; the PyTorch paths in
`momtitan.ops.recurrence` and `momtitan.ops.conv` import it lazily, on CUDA only.
"""

import os

from momtitan.ops.triton.conv_op import triton_short_conv, triton_short_conv_step
from momtitan.ops.triton.launch import MAX_HEAD_DIM
from momtitan.ops.triton.recurrence_op import triton_linear_recurrence
from momtitan.ops.triton.step_op import triton_linear_recurrence_step

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# On for CUDA tensors by default (the GPU matrix, every rule x head dims 16-256 x dtypes, run on an
# H200: docs/gpu_notes.md). MOMTITAN_TRITON=0 sends CUDA tensors to the PyTorch paths instead.
_SWITCH = os.environ.get("MOMTITAN_TRITON", "1")
if _SWITCH not in ("0", "1"):
    raise ValueError(f"MOMTITAN_TRITON must be 0 (PyTorch paths) or 1 (Triton kernels), got {_SWITCH!r}")
DISABLED = _SWITCH == "0"


def _supported_dtype(t) -> bool:
    return str(t.dtype).removeprefix("torch.") in SUPPORTED_DTYPES


def supports(q, v) -> bool:
    """Whether the Triton kernels handle these inputs (dtype and head dims)."""
    return (
        not DISABLED
        and _supported_dtype(q)
        and q.shape[-1] <= MAX_HEAD_DIM
        and v.shape[-1] <= MAX_HEAD_DIM
    )


def supports_conv(*tensors) -> bool:
    """Whether the Triton short-conv kernels handle these tensors (dtypes; None entries ignored)."""
    return not DISABLED and all(t is None or _supported_dtype(t) for t in tensors)


__all__ = [
    "triton_linear_recurrence", "triton_linear_recurrence_step", "triton_short_conv", "triton_short_conv_step",
    "supports", "supports_conv",
]
