"""Argument checks shared across the package: one wording for one kind of mistake."""

from __future__ import annotations

from pathlib import Path

import torch

# the dtypes a command line or a config may name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def require_positive_int(name: str, value) -> None:
    """ValueError naming `name` and `value` unless `value` is an int (not a bool) > 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_optional_float(name: str, value) -> None:
    """ValueError naming `name` and `value` unless `value` is None or a number (not a bool)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name} must be a float or None, got {value!r}")


def require_same_device(reference: str, like: torch.Tensor, **tensors) -> None:
    """ValueError naming the first of `tensors` (None skipped) not on `like`'s device; checked up front,
    a mismatch would otherwise fail deep inside a kernel launch."""
    for name, x in tensors.items():
        if x is not None and x.device != like.device:
            raise ValueError(f"{name} must be on {reference}'s device {like.device}, got {x.device}")


def autograd_records(*tensors) -> bool:
    """True when autograd is recording and one of `tensors` (None skipped) requires grad: the fused
    decode-step kernels have no backward, so such calls keep the PyTorch path."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def existing_folder(path, what: str = "checkpoint path") -> Path:
    """`path` as a Path; FileNotFoundError if it is missing or not a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} is not a folder: {path}")
    return path


def as_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """A `torch.dtype`, or None, from a dtype or its name in `DTYPES`; ValueError naming `name` otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
