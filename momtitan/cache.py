"""Decoding state: per layer, fixed-shape tensors that prefill fills and each step advances in place.

A MoM layer keeps one recurrent state and one conv window per stream: `m*B + b` for memory m of
sequence b, then `E*B + b` for b's shared memory. An attention layer keeps its keys, values and
the document index of every cached position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from momtitan.config import MoMModelArgs
from momtitan.checks import require_positive_int


@dataclass
class MoMLayerState:
    recurrent: torch.Tensor  # [(E+1)*B, H, K, V] fp32 (E*B without the shared memory)
    conv: torch.Tensor       # [(E+1)*B, 2*key_dim + value_dim, W-1]: the last W-1 conv inputs


@dataclass
class AttentionLayerState:
    k: torch.Tensor    # [B, kv_heads, max_len, head_dim]
    v: torch.Tensor    # [B, kv_heads, max_len, head_dim]
    doc: torch.Tensor  # [B, max_len] document index of each cached position


@dataclass
class ModelCache:
    layers: list
    position: torch.Tensor  # 0-dim int64: tokens seen so far
    batch_size: int         # B: the sequences it holds (the model checks its inputs against it)

    @property
    def max_len(self) -> int | None:
        """The positions the attention layers' caches hold (None without attention layers: the MoM
        layers' states do not grow)."""
        lengths = [layer.k.shape[2] for layer in self.layers if isinstance(layer, AttentionLayerState)]
        return min(lengths) if lengths else None

    @classmethod
    def allocate(cls, args: MoMModelArgs, batch_size: int, device=None, dtype=torch.float32, max_len: int | None = None):
        """Zeroed caches for `batch_size` sequences; `max_len` bounds attention layers' caches."""
        require_positive_int("batch_size", batch_size)
        max_len = max_len or args.max_seq_len
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        streams = (args.num_memories + int(args.shared_mem)) * batch_size
        conv_dim = 2 * args.key_dim + args.value_dim
        layers = []
        for i in range(args.num_hidden_layers):
            if i in args.attn_layers:
                kv_heads = args.attn_num_kv_heads or args.attn_num_heads
                head_dim = args.hidden_size // args.attn_num_heads
                shape = (batch_size, kv_heads, max_len, head_dim)
                layers.append(AttentionLayerState(
                    torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                    torch.zeros(batch_size, max_len, device=device, dtype=torch.int64),
                ))
            else:
                layers.append(MoMLayerState(
                    torch.zeros(streams, args.num_heads, args.head_dim, args.head_v_dim, device=device, dtype=state_dtype),
                    torch.zeros(streams, conv_dim, args.conv_size - 1, device=device, dtype=dtype),
                ))
        return cls(layers, torch.zeros((), dtype=torch.int64, device=device), batch_size)
