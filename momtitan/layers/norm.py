"""RMSNorm, and the gated RMSNorm of the MoM output (per head, times SiLU of a gate)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(RMSNorm):
    """`rmsnorm(x) * weight * silu(gate)`, normalising over the last dim (one head)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        y = F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps)
        return (y * F.silu(gate.to(dtype))).to(gate.dtype)
