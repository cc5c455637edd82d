"""Triton kernels for `linear_recurrence` (chunked forward and backward) and for the decode step,
registered as `torch.library` custom ops in the `momtitan` namespace. Importing this package
imports triton; the PyTorch paths in `momtitan.ops.recurrence` import it lazily, on CUDA only.
"""

from momtitan.ops.triton.launch import MAX_HEAD_DIM
from momtitan.ops.triton.recurrence_op import triton_linear_recurrence
from momtitan.ops.triton.step_op import triton_linear_recurrence_step

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def supports(q, v) -> bool:
    """Whether the Triton kernels handle these inputs (dtype and head dims)."""
    return (
        str(q.dtype).removeprefix("torch.") in SUPPORTED_DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and v.shape[-1] <= MAX_HEAD_DIM
    )


__all__ = ["triton_linear_recurrence", "triton_linear_recurrence_step", "supports"]
