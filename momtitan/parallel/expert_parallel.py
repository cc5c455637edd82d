"""Expert parallelism for MoM: each rank of an `ep` group holds E/ep memories, and the routed rows
travel by all-to-all to the rank that owns their memory.

One MoM layer's forward under EP, on every rank:

1. Route and plan as usual. The routed rows are in (memory, batch, time) order, so the rows bound
   for rank r (memories `r*E_local ...`) are one contiguous block.
2. All-to-all of the per-(memory, batch) counts; their sums become the split sizes on the host.
   This device-to-host copy is the one host sync per layer (torchtitan's MoE has the same); the
   shared memory's projections, conv and recurrence are queued before the host waits for it.
3. All-to-all of the rows (x | q | reset flag), differentiable.
4. The owner reorders what it received from (source, memory, batch, time) to (memory, source,
   batch, time) and runs `MoMLayer.run_stream` on them: segments
   (memory, source, batch) keep causal order, so each memory sees exactly the token subsequence it
   would see without EP.
5. The routed outputs go back by the inverse all-to-all; the source combines them with its shared
   output as usual.

Under `torch.compile` only the three exchanges (steps 2, 3 and 5) are compiler-disabled: the
routing, the shared memory, the reorder and the routed rows' projections, conv and recurrence
compile, with the received row count as the one dynamic size (off the Triton kernels, the
recurrence's PyTorch path runs between graphs: its loop over chunks would recompile for every
chunk count). The split sizes travel between the exchanges inside an object the graphs never read,
so a new routing recompiles nothing.

Weights: `MemoryProjections` parameters become DTensors sharded on dim 0 over the ep mesh, so DCP
saves and loads them whole. Everything else is replicated across ep (FSDP shards it as usual).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from momtitan.layers.mom import MoMLayer
from momtitan.parallel.comm_timer import ALL_TO_ALL


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of rows: forward sends `in_sizes` rows to each rank and receives
    `out_sizes`; backward sends the gradients back the same way. Plain blocking c10d calls (the
    exchange runs outside compiled graphs anyway), so nothing is left in flight at shutdown. Both
    directions count towards `comm_timer.ALL_TO_ALL`."""

    @staticmethod
    def forward(ctx, rows, out_sizes, in_sizes, group):
        ctx.out_sizes, ctx.in_sizes, ctx.group = out_sizes, in_sizes, group
        out = rows.new_empty(sum(out_sizes), *rows.shape[1:])
        with ALL_TO_ALL.measure(rows.device):
            torch.distributed.all_to_all_single(out, rows.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.in_sizes), *grad.shape[1:])
        with ALL_TO_ALL.measure(grad.device):
            torch.distributed.all_to_all_single(back, grad.contiguous(), ctx.in_sizes, ctx.out_sizes, group=ctx.group)
        return back, None, None, None


class MemoryExchange:
    """Runs a MoM layer's routed rows on the ranks that own their memories (installed by
    `apply_expert_parallel` as `MoMLayer.expert_parallel`)."""

    def __init__(self, mesh: DeviceMesh, num_memories: int):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.ep = mesh.size()
        self.rank = mesh.get_local_rank()
        self.local_memories = num_memories // self.ep

    def __call__(self, layer: MoMLayer, flat, q_tok, plan, reset) -> torch.Tensor:
        """Compiled around three compiler-disabled steps (the exchanges, which need the split sizes
        on the host); the routed rows' count is the one dynamic size in the graphs between them."""
        ep, El = self.ep, self.local_memories
        B = plan.counts.shape[1]
        R = plan.token_of_row.numel()
        shared = layer.shared_mem
        # 1-2. counts: send[dst] = my counts for dst's memories [El, B]; recv[src] = src's counts for mine
        send_counts = plan.counts.view(ep, El * B).contiguous()
        recv_counts, sizes = _exchange_counts(send_counts, self.group)
        # the shared memory needs nothing from the exchange: queue it before the host waits for the
        # sizes (the one host sync per layer), so the GPU has work meanwhile
        o_shared = None
        if shared:
            T = flat.shape[0] // B
            cu_shared = T * torch.arange(B + 1, device=flat.device)
            o_shared, _, _ = layer.run_stream(None, None, flat, q_tok, cu_shared, None,
                                              None if reset is None else reset[R:])

        # 3. rows out: x | q | reset
        flag = (reset[:R] if reset is not None else flat.new_zeros(R, dtype=torch.bool)).to(flat.dtype)
        rows = torch.cat([flat[plan.token_of_row], q_tok[plan.token_of_row], flag[:, None]], dim=1)
        got = _exchange_rows(rows, sizes, self.group, home=False)

        # 4. reorder (source, memory, batch) -> (memory, source, batch) and run the local memories
        counts = recv_counts.view(ep, El, B)
        group_of_row = torch.repeat_interleave(
            torch.arange(ep * El * B, device=flat.device), counts.reshape(-1), output_size=got.shape[0])
        src, rest = group_of_row // (El * B), group_of_row % (El * B)
        key = (rest // B) * (ep * B) + src * B + rest % B
        order = torch.argsort(key, stable=True)
        got = got[order]
        D, K = flat.shape[1], q_tok.shape[1]
        x_rows, q_rows, flags = got[:, :D], got[:, D : D + K], got[:, -1] > 0.5
        seg_counts = counts.permute(1, 0, 2).reshape(-1)
        cu = torch.cat([seg_counts.new_zeros(1), torch.cumsum(seg_counts, 0)])
        memory_offsets = cu[ep * B :: ep * B].to(torch.int32)
        routed, _, _ = layer.run_stream(x_rows, q_rows, None, None, cu, memory_offsets,
                                        None if reset is None else flags, varying_rows=True)

        # 5. routed outputs back to their source, in the source's row order
        back = torch.empty_like(routed).index_copy(0, order, routed)
        routed_home = _exchange_rows(back, sizes, self.group, home=True)
        return torch.cat([routed_home, o_shared]) if shared else routed_home


class SplitSizes:
    """The rows this rank sends to and receives from each rank of the group, read on the host at the
    first `lists()`. On CUDA the counts are copied into pinned memory behind an event, so `lists()`
    waits for that copy, not for the work queued after it. The compiled graphs only pass this
    object between the exchange steps (which are compiler-disabled), so new sizes never recompile."""

    def __init__(self, send_counts: torch.Tensor, recv_counts: torch.Tensor):
        sizes = torch.stack([send_counts.sum(1), recv_counts.sum(1)])
        self._copied = None
        if sizes.is_cuda:
            self._host = torch.empty(sizes.shape, dtype=sizes.dtype, pin_memory=True)
            self._host.copy_(sizes, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = sizes
        self._lists = None

    def lists(self) -> tuple[list[int], list[int]]:
        """`(send, recv)` row counts per rank; the host sync, once."""
        if self._lists is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._lists = (self._host[0].tolist(), self._host[1].tolist())
        return self._lists


@torch.compiler.disable  # a collective and its sizes: run as is, between compiled graphs
def _exchange_counts(send_counts: torch.Tensor, group) -> tuple[torch.Tensor, SplitSizes]:
    """All-to-all of the per-(memory, batch) row counts; starts their copy to the host."""
    recv_counts = torch.empty_like(send_counts)
    with ALL_TO_ALL.measure(send_counts.device):
        torch.distributed.all_to_all_single(recv_counts, send_counts, group=group)
    return recv_counts, SplitSizes(send_counts, recv_counts)


@torch.compiler.disable  # data-dependent output size
def _exchange_rows(rows: torch.Tensor, sizes: SplitSizes, group, home: bool) -> torch.Tensor:
    """Routed rows to their memories' owners, or (`home`) their outputs back to the sources."""
    send, recv = sizes.lists()
    return _AllToAll.apply(rows, send, recv, group) if home else _AllToAll.apply(rows, recv, send, group)


def check_expert_parallel_degree(num_memories: int, ep: int, world_size: int) -> None:
    """Fail at start, with the values, on degrees that cannot work."""
    if ep < 1 or world_size % ep:
        raise ValueError(f"expert_parallel_degree {ep} must divide the world size {world_size}")
    if num_memories % ep:
        raise ValueError(f"num_memories ({num_memories}) must be divisible by expert_parallel_degree, got {ep}")


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoM layer's memories over `ep_mesh` (1-D) and route its rows by all-to-all."""
    ep = ep_mesh.size()
    for block in model.layers.values():
        layer = block.mixer
        if not isinstance(layer, MoMLayer):
            continue
        check_expert_parallel_degree(layer.num_memories, ep, torch.distributed.get_world_size())
        rank = ep_mesh.get_local_rank()
        for name, param in list(layer.memories.named_parameters(recurse=False)):
            # each rank keeps its own block of memories; no communication, so this works on meta too
            local = param.data.chunk(ep, dim=0)[rank]
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(layer.memories, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        layer.expert_parallel = MemoryExchange(ep_mesh, layer.num_memories)
