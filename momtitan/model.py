"""The MoM language model: embeddings -> pre-norm blocks (MoM or attention, then SwiGLU) -> norm -> head.

torchtitan-shaped: `layers` is a ModuleDict of blocks, `init_weights` works after building on the
meta device, and `get_nparams_and_flops` feeds MFU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from momtitan.cache import ModelCache
from momtitan.config import MoMModelArgs
from momtitan.layers.attention import Attention
from momtitan.layers.mlp import SwiGLU
from momtitan.layers.mom import MoMLayer
from momtitan.layers.norm import RMSNorm


class MoMOutput(NamedTuple):
    logits: torch.Tensor       # [B, T, vocab]
    aux_loss: torch.Tensor     # scalar: mean load-balance loss over MoM layers (unscaled; k at balance)
    memory_load: torch.Tensor  # [num MoM layers, E]: share of routed rows per memory (detached)


class Block(nn.Module):
    def __init__(self, args: MoMModelArgs, layer_id: int):
        super().__init__()
        self.is_attention = layer_id in args.attn_layers
        self.mixer_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mixer = Attention(args) if self.is_attention else MoMLayer(args)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size)

    def forward(self, h, doc_starts=None, state=None, start=None, valid=None):
        """Returns `(h, aux_loss, memory_load)`; attention blocks return None for the last two."""
        x = self.mixer_norm(h)
        if self.is_attention:
            out, aux, load = self.mixer(x, doc_starts, state, start), None, None
        else:
            out, aux, load = self.mixer(x, doc_starts, state, valid)
        h = h + out
        return h + self.mlp(self.mlp_norm(h)), aux, load

    def step(self, h, state, start):
        x = self.mixer_norm(h)
        out = self.mixer(x, None, state, start) if self.is_attention else self.mixer.step(x, state)
        h = h + out
        return h + self.mlp(self.mlp_norm(h))


class MoMTransformer(nn.Module):
    def __init__(self, args: MoMModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.num_hidden_layers)})
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialise every parameter in place; works after `to_empty` from the meta device."""
        std = self.args.initializer_range
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            block.mixer_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
            block.mlp.reset_parameters(std)
            if block.is_attention:
                block.mixer.reset_parameters(std)
            else:
                block.mixer.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    def forward(self, tokens: torch.Tensor, doc_starts: torch.Tensor | None = None, cache: ModelCache | None = None,
                valid: torch.Tensor | None = None, logits_to_keep: int = 0,
                logits_at: torch.Tensor | None = None) -> MoMOutput:
        """`tokens [B, T]`; `doc_starts [B, T]` bool marks the first token of each packed document;
        with `cache`, this is a prefill that continues from and advances the cache. `valid [B, T]`
        bool marks real tokens (padding is left out of the aux loss); `logits_to_keep > 0` computes
        logits for the last that many positions only; `logits_at [B, P]` int64 computes them at
        those positions of each sequence only (logits `[B, P, vocab]`), e.g. a task's answer
        positions, which saves the output projection and its softmax at every other position."""
        _check_tokens(tokens, self.args.vocab_size)
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens must hold at least one position, got shape {tuple(tokens.shape)}")
        _check_mask("doc_starts", doc_starts, tokens)
        _check_mask("valid", valid, tokens)
        if cache is not None:
            _check_cache(cache, tokens)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0: every position), got {logits_to_keep!r}")
        if logits_at is not None:
            if logits_to_keep:
                raise ValueError(f"pass logits_to_keep or logits_at, not both (got logits_to_keep={logits_to_keep})")
            if (not isinstance(logits_at, torch.Tensor) or logits_at.dtype != torch.int64 or logits_at.dim() != 2
                    or logits_at.shape[0] != tokens.shape[0]):
                raise ValueError(f"logits_at must be an int64 tensor of shape [{tokens.shape[0]}, P], got "
                                 f"{getattr(logits_at, 'dtype', type(logits_at).__name__)} {tuple(getattr(logits_at, 'shape', ()))}")
        h = self.tok_embeddings(tokens)
        auxes, loads = [], []
        start = None if cache is None else cache.position
        for i, block in enumerate(self.layers.values()):
            h, aux, load = block(h, doc_starts, None if cache is None else cache.layers[i], start, valid)
            if aux is not None:
                auxes.append(aux)
                loads.append(load)
        if cache is not None:
            cache.position += tokens.shape[1]
        aux = torch.stack(auxes).mean() if auxes else h.new_zeros((), dtype=torch.float32)
        load = torch.stack(loads) if loads else h.new_zeros(0, self.args.num_memories, dtype=torch.float32)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        elif logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        return MoMOutput(self._head(h), aux, load)

    def decode_step(self, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """One token per sequence, `tokens [B, 1]` -> logits `[B, 1, vocab]`; advances `cache` in place."""
        _check_tokens(tokens, self.args.vocab_size)
        if tokens.shape[1] != 1:
            raise ValueError(f"decode_step takes tokens of shape [B, 1], got {tuple(tokens.shape)}")
        _check_cache(cache, tokens)
        h = self.tok_embeddings(tokens)
        for i, block in enumerate(self.layers.values()):
            h = block.step(h, cache.layers[i], cache.position)
        cache.position += 1
        return self._head(h)


def _check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a [B, T] tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32, got {tokens.dtype}")
    # An id outside the vocabulary would fail inside the embedding with an unnamed IndexError. The
    # check reads the ids: free on the CPU, a host sync per step on an accelerator, where training and
    # decoding stay sync-free and a bad id ends in the embedding's device-side assert instead (and
    # compiled code never checks values).
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling() and tokens.numel():
        low, high = torch.stack(torch.aminmax(tokens)).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"tokens must be ids in [0, vocab_size={vocab_size}), got ids in [{low}, {high}]")


def _check_mask(name: str, mask: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """ValueError naming `name` unless `mask` is None or a bool tensor of the tokens' shape."""
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape or mask.dtype != torch.bool):
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(tokens.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")


def _check_cache(cache: ModelCache, tokens: torch.Tensor) -> None:
    if cache.batch_size != tokens.shape[0]:
        raise ValueError(f"cache holds batch size {cache.batch_size}, got tokens of batch size {tokens.shape[0]}")
    # Room in the attention layers' caches, checked before any layer writes (a failure half-way would
    # leave the layers before it advanced). It reads the position: as for token ids, on the CPU only,
    # and never in compiled code (`Generator` and `MoMForCausalLM` size their caches on the host).
    if torch.compiler.is_compiling() or cache.position.device.type != "cpu":
        return
    max_len = cache.max_len
    if max_len is not None:
        filled = int(cache.position)
        if filled + tokens.shape[1] > max_len:
            raise ValueError(f"the cache's attention layers hold max_len={max_len} positions, {filled} filled: "
                             f"no room for {tokens.shape[1]} more tokens (allocate a larger max_len)")


def recurrence_flops_per_token(args: MoMModelArgs, chunk_size: int = 64) -> int:
    """Forward FLOPs of the chunked recurrence per token and stream (ANCHORS.md §1.9 model)."""
    dk, dv, C = args.head_dim, args.head_v_dim, chunk_size
    flops = 2 * C * (dk + dv) + 4 * dk * dv  # intra-chunk q k^T, (q k^T) v; inter q S, state update
    if args.uses_delta:
        flops += 2 * C * (2 * dk + dv) + 2 * dk * dv  # beta k k^T, W = T k, U = T v, u = U - W S
    return args.num_heads * flops


def get_nparams_and_flops(args: MoMModelArgs, model: nn.Module, seq_len: int) -> tuple[int, int]:
    """Total parameters, and training FLOPs per token (forward + backward = 3x forward).

    Matmul FLOPs count 6 per *activated* weight (routed memories' projections k times out of E);
    the recurrence runs k (+1 shared) streams per token; attention layers add 6 * heads * head_dim *
    seq_len (causal half of 12). Embedding lookups are free; the output head is a matmul.
    """
    nparams = sum(p.numel() for p in model.parameters())
    E, k = args.num_memories, args.topk
    active = nparams - model.tok_embeddings.weight.numel()
    for block in model.layers.values():
        if not block.is_attention:
            stacked = sum(p.numel() for p in block.mixer.memories.parameters())
            active -= stacked * (E - k) // E
    head = args.vocab_size * args.hidden_size  # the output matmul, tied or not
    if args.tie_word_embeddings:
        active += head
    num_mom = args.num_hidden_layers - len(args.attn_layers)
    streams = k + int(args.shared_mem)
    flops = 6 * active + 3 * num_mom * streams * recurrence_flops_per_token(args)
    flops += 6 * len(args.attn_layers) * args.hidden_size * seq_len
    return nparams, flops
