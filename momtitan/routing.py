"""Routing tokens to memories: the router, the dispatch plan, and the weighted combine.

The plan lays out one *stream* of rows that every memory of a layer runs through in a single
`linear_recurrence` call:

    rows [0, R)         routed copies, R = B*T*k, in memory-major (memory, batch, time) order
    rows [R, R + B*T)   the shared memory's rows: every token, in (batch, time) order

Segment `m*B + b` holds the tokens of row b routed to memory m, in time order (the sort is
stable); segment `E*B + b` is row b's shared-memory segment. Segments may be empty. Memory-major
order keeps each memory's rows contiguous, so the per-memory projections are one grouped GEMM
over E groups and expert parallelism can ship whole groups.

Counts come from the top-k indices, never from the weights (a bf16/fp16 weight can round to 0).
All shapes depend on B, T, k and E only: there are no host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    probs: torch.Tensor    # [B, T, E] fp32 (or fp64) softmax of the router logits
    weights: torch.Tensor  # [B, T, k] renormalised top-k probabilities, in the dtype of probs
    indices: torch.Tensor  # [B, T, k] int64 chosen memories


def route(logits: torch.Tensor, topk: int) -> Routing:
    """Softmax in fp32 (fp64 for fp64 logits), top-k, renormalise. No noise, no capacity: every
    token keeps its k memories."""
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= logits.shape[-1]:
        raise ValueError(f"topk must be an integer in [1, {logits.shape[-1]}] (the memories), got {topk!r}")
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    weights, indices = torch.topk(probs, topk, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(probs, weights, indices)


class DispatchPlan(NamedTuple):
    token_of_row: torch.Tensor   # [R] flat token index b*T + t of each routed row
    row_of_slot: torch.Tensor    # [B*T*k] routed row of slot (b, t, j): the inverse permutation
    memory_offsets: torch.Tensor  # [E] int32 end row of each memory's group (for grouped GEMM)
    cu_seqlens: torch.Tensor     # [E*B (+ B) + 1] int64 segment offsets in the stream
    counts: torch.Tensor         # [E, B] int64 tokens routed to each (memory, row)


def plan_dispatch(indices: torch.Tensor, num_memories: int, shared: bool) -> DispatchPlan:
    B, T, k = indices.shape
    E = num_memories
    device = indices.device
    batch = torch.arange(B, device=device).view(B, 1, 1).expand(B, T, k)
    key = (indices * B + batch).reshape(-1)  # segment m*B + b of each slot
    perm = torch.argsort(key, stable=True)
    R = key.numel()
    row_of_slot = torch.empty_like(perm).scatter_(0, perm, torch.arange(R, device=device))
    counts = torch.zeros(E * B, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    cu = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    if shared:
        cu = torch.cat([cu, R + T * torch.arange(1, B + 1, device=device)])
    memory_offsets = cu[B : E * B + 1 : B].to(torch.int32)
    return DispatchPlan(perm // k, row_of_slot, memory_offsets, cu, counts.view(E, B))


def stream_resets(doc_starts: torch.Tensor, plan: DispatchPlan, shared: bool) -> torch.Tensor:
    """Reset flags for the stream rows: a row resets when its document differs from that of the
    previous row of its segment (the first row compares with document 0, the one a cache continues)."""
    B, T = doc_starts.shape
    doc = torch.cumsum(doc_starts.long(), dim=1).reshape(-1)  # document index of each token in its row
    routed_doc = doc[plan.token_of_row]
    previous = torch.cat([routed_doc.new_zeros(1), routed_doc[:-1]])
    R = routed_doc.numel()
    starts = plan.cu_seqlens[: plan.counts.numel()]  # may equal R for empty trailing segments
    segment_start = torch.zeros(R + 1, dtype=torch.bool, device=doc.device).index_fill_(0, starts, True)[:R]
    previous = torch.where(segment_start, 0, previous)
    reset = routed_doc != previous
    if shared:
        reset = torch.cat([reset, doc_starts.reshape(-1)])
    return reset


def stale_streams(doc_starts: torch.Tensor, plan: DispatchPlan, shared: bool) -> torch.Tensor:
    """`[E*B (+B)]` bool: streams whose final state belongs to an earlier document than their row's
    last token (they saw no token of the last document). A cache must zero them after a prefill.
    A shared stream sees every token, so it is never stale."""
    B, T = doc_starts.shape
    doc = torch.cumsum(doc_starts.long(), dim=1)
    last_doc = doc[:, -1].repeat(plan.counts.shape[0])  # [E*B], segment m*B + b -> row b
    ends = plan.cu_seqlens[1 : plan.counts.numel() + 1]
    routed_doc = doc.reshape(-1)[plan.token_of_row]
    seen = torch.where(plan.counts.reshape(-1) > 0, routed_doc[(ends - 1).clamp(min=0)], 0)
    stale = seen != last_doc
    return torch.cat([stale, stale.new_zeros(B)]) if shared else stale


def combine(routed: torch.Tensor, shared: torch.Tensor | None, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
    """`sum_j w_j * o[row of (b, t, j)]` (+ the shared output): `routed [R, F]`, `shared [B*T, F]` -> `[B, T, F]`."""
    B, T, k = weights.shape
    out = (routed[plan.row_of_slot].view(B, T, k, -1) * weights[..., None].to(routed.dtype)).sum(2)
    if shared is not None:
        out = out + shared.view(B, T, -1)
    return out


def load_balance_loss(routing: Routing, num_memories: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style auxiliary loss of one layer and its memory load.

    `aux = E * sum_e f_e * P_e`, with `f_e` the share of tokens that picked memory e (from the
    indices; it sums to k) and `P_e` the mean router probability of e. It equals k under perfectly
    uniform routing. `valid [B, T]` (bool) leaves padding out of both means. Returns
    `(aux, load)` with `load = f / k`, the share of routed rows per memory.
    """
    E = num_memories
    k = routing.indices.shape[-1]
    weight = routing.probs.new_ones(routing.indices.shape[:2]) if valid is None else valid.to(routing.probs.dtype)
    tokens = weight.sum().clamp_min(1)
    picks = routing.probs.new_zeros(E).scatter_add_(
        0, routing.indices.reshape(-1), weight[..., None].expand_as(routing.indices).reshape(-1))
    f = picks / tokens
    P = (routing.probs * weight[..., None]).reshape(-1, E).sum(0) / tokens
    return E * (f * P).sum(), (f / k).detach()
