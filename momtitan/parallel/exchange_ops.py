"""The expert-parallel exchanges as `torch.library` custom ops.

Being ops, they are visible to per-op selective activation checkpointing, which keeps their outputs
(`parallelize.SAC_SAVE_OPS`): the backward's recompute of a MoM layer then replays the cached rows
and split sizes, so it neither communicates nor waits for the host a second time (full AC has no
such policy and runs them again). Both ops run
eagerly between compiled graphs (their output sizes are data); both count towards
`comm_timer.ALL_TO_ALL`.

- `momtitan::ep_exchange_counts(send_counts [ep, n], group) -> (recv_counts [ep, n], host_totals [2, ep])`:
  all-to-all of per-rank count blocks; `host_totals` (rows sent to / received from each rank) is a
  CPU tensor, copied without blocking on CUDA; `SplitSizes` reads it, waiting for that copy alone.
- `momtitan::ep_all_to_all_rows(rows, out_sizes, in_sizes, group) -> rows`: the differentiable row
  exchange; its backward sends the gradients back the way the rows came.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from momtitan.parallel.comm_timer import ALL_TO_ALL

# CUDA events of host copies not yet waited for, by the host tensor's address (one entry per
# `ep_exchange_counts` call, removed by the first `SplitSizes.lists` of its result)
_PENDING_COPIES: dict[int, torch.cuda.Event] = {}


@torch.library.custom_op("momtitan::ep_exchange_counts", mutates_args=())
def exchange_counts(send_counts: torch.Tensor, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    recv_counts = torch.empty_like(send_counts)
    with ALL_TO_ALL.measure(send_counts.device):
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=_resolve_process_group(group_name))
    totals = torch.stack([send_counts.sum(1), recv_counts.sum(1)])
    if not totals.is_cuda:
        return recv_counts, totals
    host = torch.empty(totals.shape, dtype=totals.dtype, pin_memory=True)
    host.copy_(totals, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    _PENDING_COPIES[host.data_ptr()] = copied
    return recv_counts, host


@exchange_counts.register_fake
def _(send_counts, group_name):
    return torch.empty_like(send_counts), send_counts.new_empty((2, send_counts.shape[0]), device="cpu")


class SplitSizes:
    """The rows this rank sends to and receives from each rank, from `ep_exchange_counts`' host
    tensor, read at the first `lists()`. Reading a fresh result waits for its copy (the one host sync
    per layer), not for later queued work; a result replayed by selective checkpointing was read in
    the forward and waits for nothing. Compiled graphs only pass this object between the exchanges
    (which are compiler-disabled), so new sizes never recompile."""

    def __init__(self, host_totals: torch.Tensor):
        self._host = host_totals
        self._lists = None

    def lists(self) -> tuple[list[int], list[int]]:
        """`(send, recv)` row counts per rank."""
        if self._lists is None:
            copied = _PENDING_COPIES.pop(self._host.data_ptr(), None)
            if copied is not None:
                copied.synchronize()
            self._lists = (self._host[0].tolist(), self._host[1].tolist())
        return self._lists


@torch.library.custom_op("momtitan::ep_all_to_all_rows", mutates_args=())
def all_to_all_rows(rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group_name: str) -> torch.Tensor:
    out = rows.new_empty(sum(out_sizes), *rows.shape[1:])
    with ALL_TO_ALL.measure(rows.device):
        dist.all_to_all_single(out, rows.contiguous(), out_sizes, in_sizes, group=_resolve_process_group(group_name))
    return out


@all_to_all_rows.register_fake
def _(rows, out_sizes, in_sizes, group_name):
    return rows.new_empty(sum(out_sizes), *rows.shape[1:])


def _save_sizes(ctx, inputs, output):
    _, ctx.out_sizes, ctx.in_sizes, ctx.group_name = inputs


def _send_gradients_back(ctx, grad):
    return all_to_all_rows(grad, ctx.in_sizes, ctx.out_sizes, ctx.group_name), None, None, None


all_to_all_rows.register_autograd(_send_gradients_back, setup_context=_save_sizes)
