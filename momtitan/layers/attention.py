"""Softmax attention for the hybrid model: GQA, RoPE, causal and document masking, a KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from momtitan.cache import AttentionLayerState
from momtitan.config import MoMModelArgs


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate `x [B, H, T, d]` by `positions [T]` (half-split RoPE)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.double()[:, None] * inv_freq.double()[None]  # [T, d/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: MoMModelArgs):
        super().__init__()
        self.num_heads = args.attn_num_heads
        self.num_kv_heads = args.attn_num_kv_heads or args.attn_num_heads
        self.head_dim = args.hidden_size // self.num_heads
        self.rope_theta = args.rope_theta
        D = args.hidden_size
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=False)

    def reset_parameters(self, std: float) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(linear.weight, std=std)

    def _heads(self, x, positions):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta), v

    def _attend(self, q, k, v, mask):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=self.num_kv_heads != self.num_heads)
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, doc_starts=None, state: AttentionLayerState | None = None, start: torch.Tensor | None = None):
        """Causal attention within documents. With `state`, keys and values go to positions
        `[start, start+T)` of the cache and queries also attend to earlier cached positions."""
        B, T, _ = x.shape
        offset = start if start is not None else torch.zeros((), dtype=torch.int64, device=x.device)
        positions = offset + torch.arange(T, device=x.device)
        q, k, v = self._heads(x, positions)
        doc = torch.zeros(B, T, dtype=torch.int64, device=x.device)
        if doc_starts is not None:
            doc = torch.cumsum(doc_starts.long(), dim=1)
        if state is None:
            mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            return self._attend(q, k, v, mask)
        base = state.doc.gather(1, (offset - 1).clamp(min=0).expand(B, 1))  # doc of the last cached token
        doc = doc + torch.where(offset > 0, base, 0)
        state.k.index_copy_(2, positions, k.to(state.k.dtype))
        state.v.index_copy_(2, positions, v.to(state.v.dtype))
        state.doc.index_copy_(1, positions, doc)
        cached = torch.arange(state.k.shape[2], device=x.device)
        mask = (cached[None, None, :] <= positions[None, :, None]) & (state.doc[:, None, :] == doc[:, :, None])
        return self._attend(q, state.k.to(q.dtype), state.v.to(q.dtype), mask)
