"""Triton kernels for `linear_recurrence` (chunked forward and backward) and for the decode step,
registered as `torch.library` custom ops in the `momtitan` namespace. Importing this package
imports triton; the PyTorch paths in `momtitan.ops.recurrence` import it lazily, on CUDA only.
"""

import os

from momtitan.ops.triton.launch import MAX_HEAD_DIM
from momtitan.ops.triton.recurrence_op import triton_linear_recurrence
from momtitan.ops.triton.step_op import triton_linear_recurrence_step

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# Opt-in until the whole GPU test matrix passes (see docs/gpu_notes.md, 2026-11-26 second entry: the
# head-dim 16/64/128 cases and the model pass on an H200; head dim 256 hit an illegal memory access,
# a fix is in but unverified). MOMTITAN_TRITON=1 turns the kernels on; otherwise CUDA uses the
# PyTorch paths. Once head dim 256 passes, flip to: DISABLED = os.environ.get("MOMTITAN_TRITON", "1") == "0".
DISABLED = os.environ.get("MOMTITAN_TRITON", "0") != "1"


def supports(q, v) -> bool:
    """Whether the Triton kernels handle these inputs (dtype and head dims)."""
    return (
        not DISABLED
        and str(q.dtype).removeprefix("torch.") in SUPPORTED_DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and v.shape[-1] <= MAX_HEAD_DIM
    )


__all__ = ["triton_linear_recurrence", "triton_linear_recurrence_step", "supports"]
