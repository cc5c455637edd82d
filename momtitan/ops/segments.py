"""Index arithmetic for packed token streams: which segment a token is in, where its run starts.

A *stream* is `[1, T]` tokens holding `N` segments described by `cu_seqlens` (`[N+1]`, int,
non-decreasing, `cu_seqlens[0] == 0`, `cu_seqlens[-1] == T`; empty segments allowed).
Each segment has its own initial state. Inside a segment, a `reset` flag on a token zeroes the
state right before that token (a document boundary). A *run* is the stretch of tokens that
share one state history: it starts at a segment start or at a reset.

Everything here is computed on the device, with shapes fixed by `T` and `N` only: no host syncs.
"""

from __future__ import annotations

import torch


def uniform_cu_seqlens(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """`cu_seqlens` of `batch` rows of `seq_len` tokens each, laid end to end."""
    return torch.arange(batch + 1, device=device, dtype=torch.int64) * seq_len


def padded_num_chunks(total: int, num_segments: int, chunk: int) -> int:
    """Chunks of the padded layout in which each of `num_segments` segments of `total` tokens in all
    starts on a chunk boundary: at most `ceil((total + num_segments*(chunk-1)) / chunk)`, from shapes
    alone (at least 1)."""
    return max(1, -(-(total + num_segments * (chunk - 1)) // chunk))


def bucket_of_index(ends: torch.Tensor, n: int) -> torch.Tensor:
    """For each index `i < n`, how many of the non-decreasing `ends` are `<= i`: the bucket of `i`
    when bucket `j` covers `[ends[j-1], ends[j])`. `[n]` int64.

    That is `torch.searchsorted(ends, arange(n), right=True)`, which is what runs eagerly. Under
    `torch.compile` it is a compare-and-count instead: torch 2.11's inductor lowering of
    `searchsorted` on CUDA fails when the sorted sequence is a view (`NotImplementedError:
    SliceView`, seen compiling the 340M model). Inductor fuses the `[n, len(ends)]` comparison into
    one reduction, without materialising it.
    """
    positions = torch.arange(n, device=ends.device, dtype=ends.dtype)
    if torch.compiler.is_compiling():
        return (ends[None, :] <= positions[:, None]).sum(1)
    return torch.searchsorted(ends.contiguous(), positions, right=True)


def token_segments(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of each of the `total` tokens, `[total]` int64 (empty segments skipped)."""
    return bucket_of_index(cu_seqlens[1:], total)


def run_starts(cu_seqlens: torch.Tensor, reset: torch.Tensor | None, total: int):
    """Per token: its segment, its segment's start, its run's start, and whether the run began at
    a reset (then nothing before it, not even an initial state, is visible)."""
    cu = cu_seqlens.long()
    seg = token_segments(cu, total)
    seg_start = cu[seg]
    if reset is None:
        return seg, seg_start, seg_start, torch.zeros_like(seg, dtype=torch.bool)
    positions = torch.arange(total, device=cu.device)
    last_reset = torch.cummax(torch.where(reset, positions, -1), dim=0).values
    hard = last_reset >= seg_start
    return seg, seg_start, torch.where(hard, last_reset, seg_start), hard


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens") -> None:
    """Check the values of `cu_seqlens` against a stream of `total` tokens.

    This reads the tensor on the host, so public entry points call it and internal callers that
    build `cu_seqlens` themselves (the MoM layer) do not.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    values = cu_seqlens.detach().cpu()
    if int(values[0]) != 0 or int(values[-1]) != total:
        raise ValueError(
            f"{name} must start at 0 and end at the number of tokens {total}, "
            f"got {name}[0]={int(values[0])}, {name}[-1]={int(values[-1])}"
        )
    if bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {values.tolist()}")
