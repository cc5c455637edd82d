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
so a new routing recompiles nothing. The exchanges are custom ops (`exchange_ops`): per-op selective
activation checkpointing keeps their outputs, so the backward's recompute of a layer repeats neither
the all-to-alls nor the host sync. Full and layer-frequency AC (a plain checkpoint) do repeat them,
and rely on the recompute routing every token as the forward did (same weights, same inputs).

Weights: `MemoryProjections` parameters become DTensors sharded on dim 0 over the ep mesh, so DCP
saves and loads them whole. Everything else is replicated across ep (FSDP shards it as usual).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from momtitan.layers.mom import MoMLayer
from momtitan.parallel.exchange_ops import SplitSizes


class MemoryExchange:
    """Runs a MoM layer's routed rows on the ranks that own their memories (installed by
    `apply_expert_parallel` as `MoMLayer.expert_parallel`)."""

    def __init__(self, mesh: DeviceMesh, num_memories: int):
        self.group_name = mesh.get_group().group_name
        self.ep = mesh.size()
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
        recv_counts, sizes = _exchange_counts(send_counts, self.group_name)
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
        got = _exchange_rows(rows, sizes, self.group_name, home=False)

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
        routed_home = _exchange_rows(back, sizes, self.group_name, home=True)
        return torch.cat([routed_home, o_shared]) if shared else routed_home


@torch.compiler.disable  # a collective and its sizes: run as is, between compiled graphs
def _exchange_counts(send_counts: torch.Tensor, group_name: str) -> tuple[torch.Tensor, SplitSizes]:
    """All-to-all of the per-(memory, batch) row counts; starts their copy to the host."""
    recv_counts, host_totals = torch.ops.momtitan.ep_exchange_counts(send_counts, group_name)
    return recv_counts, SplitSizes(host_totals)


@torch.compiler.disable  # data-dependent output size
def _exchange_rows(rows: torch.Tensor, sizes: SplitSizes, group_name: str, home: bool) -> torch.Tensor:
    """Routed rows to their memories' owners, or (`home`) their outputs back to the sources."""
    send, recv = sizes.lists()
    out_sizes, in_sizes = (send, recv) if home else (recv, send)
    return torch.ops.momtitan.ep_all_to_all_rows(rows, out_sizes, in_sizes, group_name)


def check_expert_parallel_degree(num_memories: int, ep: int) -> None:
    """Every ep rank holds an equal block of each MoM layer's memories."""
    if num_memories % ep:
        raise ValueError(f"num_memories ({num_memories}) must be divisible by expert_parallel_degree, got {ep}")


def check_expert_parallel_mesh(parallel_dims) -> None:
    """torchtitan's layout borrows ep (and etp) from dp_shard * cp * tp, leaving efsdp = their quotient.
    Checked before the device mesh is built (`momtitan.train.trainer.MoMTrainer`): torchtitan builds it
    from the floored quotient and fails without naming the options."""
    p = parallel_dims
    shards = p.dp_shard * p.cp * p.tp
    if p.ep > 1 and shards % (p.ep * p.etp):
        raise ValueError(
            f"parallelism.expert_parallel_degree ({p.ep}) x expert_tensor_parallel_degree ({p.etp}) must divide "
            f"data_parallel_shard_degree ({p.dp_shard}) x context_parallel_degree ({p.cp}) x tensor_parallel_degree "
            f"({p.tp}) = {shards}: expert parallelism takes its ranks from these"
        )


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoM layer's memories over `ep_mesh` (1-D) and route its rows by all-to-all."""
    ep = ep_mesh.size()
    for block in model.layers.values():
        layer = block.mixer
        if not isinstance(layer, MoMLayer):
            continue
        check_expert_parallel_degree(layer.num_memories, ep)
        rank = ep_mesh.get_local_rank()
        for name, param in list(layer.memories.named_parameters(recurse=False)):
            # each rank keeps its own block of memories; no communication, so this works on meta too
            local = param.data.chunk(ep, dim=0)[rank]
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(layer.memories, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        layer.expert_parallel = MemoryExchange(ep_mesh, layer.num_memories)
