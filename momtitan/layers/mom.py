"""The Mixture-of-Memories layer.

    x [B, T, D]
    -> router: fp32 softmax, top-k, renormalised weights            (routing.route)
    -> dispatch plan: routed rows in (memory, batch, time) order     (routing.plan_dispatch)
       plus one shared-memory row per token
    -> q once on x (gathered to the routed rows); k/v/beta/decay of the routed rows as one
       grouped GEMM over the memories; the shared memory's with its own weights
    -> causal short conv + SiLU on q, k, v along every segment, restarting at segment starts
       and document boundaries (the same in training, prefill and decoding)
    -> one linear_recurrence call over all E*B (+B shared) segments
    -> sum_j w_j o_j + o_shared, gated RMSNorm per head, o_proj

A memory's state only moves at the tokens routed to it: un-routed memories are frozen, not decayed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from momtitan.cache import MoMLayerState
from momtitan.config import MoMModelArgs
from momtitan.layers.norm import GatedRMSNorm
from momtitan.ops.conv import _short_conv, _short_conv_step
from momtitan.ops.grouped_linear import grouped_linears
from momtitan.ops.recurrence import _linear_recurrence, _linear_recurrence_step
from momtitan.ops.segments import bucket_of_index
from momtitan.routing import combine, load_balance_loss, plan_dispatch, route, stale_streams, stream_resets


class MemoryProjections(nn.Module):
    """The routed memories' own weights: k, v, beta and decay projections, stacked `[E, out, D]`.

    Its forward projects rows grouped by memory. Kept as a module of its own so that expert
    parallelism can shard it across ranks (and FSDP treat it apart), like a MoE's experts.
    """

    def __init__(self, num_memories: int, dim: int, key_dim: int, value_dim: int, num_heads: int,
                 uses_delta: bool, uses_decay: bool):
        super().__init__()
        E, D, H = num_memories, dim, num_heads
        self.k_proj = nn.Parameter(torch.empty(E, key_dim, D))
        self.v_proj = nn.Parameter(torch.empty(E, value_dim, D))
        self.b_proj = nn.Parameter(torch.empty(E, H, D)) if uses_delta else None
        self.a_proj = nn.Parameter(torch.empty(E, H, D)) if uses_decay else None
        # rows per memory padded to a multiple of this in the k/v grouped GEMMs (16 under float8
        # grouped GEMMs: set by momtitan.parallel.float8.align_memory_groups)
        self.group_alignment = 1

    def stacked(self) -> list[torch.Tensor]:
        """The stacked weights; under expert parallelism, this rank's memories only."""
        params = [p for p in (self.k_proj, self.v_proj, self.b_proj, self.a_proj) if p is not None]
        return [p.to_local() if isinstance(p, DTensor) else p for p in params]

    def weight(self) -> torch.Tensor:
        """`[E, out, D]`: each memory's k | v | beta | decay projections, concatenated."""
        return torch.cat(self.stacked(), dim=1)

    def forward(self, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """`[R, out]`: k | v | beta | decay of each row under its own memory's weights.

        k and v: one grouped GEMM each, straight on the parameters (no concatenated weight copy per
        step). beta and decay are H columns per memory: one dense GEMM against every memory's
        weights (E * 2H columns) and a pick is cheaper than a grouped launch for so few columns.
        """
        stacked = self.stacked()
        out = grouped_linears(x, stacked[:2], group_ends, self.group_alignment)
        if len(stacked) > 2:
            small = torch.cat(stacked[2:], dim=1)  # [E, H or 2H, D]
            E, n, D = small.shape
            every = (x @ small.reshape(E * n, D).transpose(0, 1)).view(-1, E, n)
            group = bucket_of_index(group_ends, x.shape[0]).clamp(max=E - 1)
            out.append(every.gather(1, group[:, None, None].expand(-1, 1, n)).squeeze(1))
        return torch.cat(out, dim=-1)

    def reset_parameters(self, gain: float) -> None:
        """Xavier-uniform per memory. One `uniform_` on the whole parameter (all memories have the
        same fan-in and fan-out) rather than a loop over local slices: on a DTensor (FSDP, EP) this
        keeps DTensor's RNG bookkeeping, so shards on different ranks draw different values."""
        for p in (self.k_proj, self.v_proj, self.b_proj, self.a_proj):
            if p is not None:
                bound = gain * math.sqrt(6.0 / (p.shape[1] + p.shape[2]))
                nn.init.uniform_(p, -bound, bound)


class MoMLayer(nn.Module):
    def __init__(self, args: MoMModelArgs):
        super().__init__()
        D, E, H = args.hidden_size, args.num_memories, args.num_heads
        self.num_memories, self.topk, self.num_heads = E, args.topk, H
        self.head_k, self.head_v = args.head_dim, args.head_v_dim
        self.key_dim, self.value_dim = args.key_dim, args.value_dim
        self.shared_mem, self.qk_l2norm = args.shared_mem, args.qk_l2norm
        self.uses_delta, self.uses_decay = args.uses_delta, args.uses_decay
        self.conv_size = args.conv_size

        self.router = nn.Linear(D, E, bias=False)
        self.q_proj = nn.Linear(D, self.key_dim, bias=False)
        self.memories = MemoryProjections(E, D, self.key_dim, self.value_dim, H, self.uses_delta, self.uses_decay)
        self.expert_parallel = None  # set by momtitan.parallel.expert_parallel.apply_expert_parallel
        if self.shared_mem:
            self.shared_k = nn.Linear(D, self.key_dim, bias=False)
            self.shared_v = nn.Linear(D, self.value_dim, bias=False)
            self.shared_b = nn.Linear(D, H, bias=False) if self.uses_delta else None
            self.shared_a = nn.Linear(D, H, bias=False) if self.uses_decay else None
        if self.uses_decay:  # shared by every memory
            self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
            self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        # One depthwise conv over the concatenated q | k | v channels, shared by all memories.
        self.conv_weight = nn.Parameter(torch.empty(2 * self.key_dim + self.value_dim, args.conv_size))
        self.g_proj = nn.Linear(D, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v, eps=args.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)

    # ---- parameters -------------------------------------------------------------------------
    def shared_weight(self) -> torch.Tensor:
        parts = [self.shared_k, self.shared_v] + [m for m in (self.shared_b, self.shared_a) if m is not None]
        return torch.cat([m.weight for m in parts], dim=0)

    def reset_parameters(self) -> None:
        gain = 2**-2.5  # fla's MoM init for every linear of the layer
        for linear in (self.router, self.q_proj, self.g_proj, self.o_proj):
            nn.init.xavier_uniform_(linear.weight, gain=gain)
        self.memories.reset_parameters(gain)
        if self.shared_mem:
            for linear in (self.shared_k, self.shared_v, self.shared_b, self.shared_a):
                if linear is not None:
                    nn.init.xavier_uniform_(linear.weight, gain=gain)
        if self.uses_decay:
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
                dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                dt = dt.clamp_min(1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        bound = 1 / math.sqrt(self.conv_size)  # nn.Conv1d's default for a depthwise conv
        nn.init.uniform_(self.conv_weight, -bound, bound)
        self.o_norm.reset_parameters()

    # ---- shared pieces of the forward and the decoding step -----------------------------------
    def _gates(self, extra: torch.Tensor):
        """beta and the log-decay g from the extra projection columns."""
        beta = g = None
        H = self.num_heads
        if self.uses_delta:
            beta = torch.sigmoid(extra[..., :H].to(torch.promote_types(extra.dtype, torch.float32)))
        if self.uses_decay:
            a = extra[..., -H:].to(torch.promote_types(extra.dtype, torch.float32))
            g = -torch.exp(self.A_log.to(a.dtype)) * F.softplus(a + self.dt_bias.to(a.dtype))
        return beta, g

    def _conv_input(self, q: torch.Tensor, proj: torch.Tensor):
        """`(q | k | v, beta, g)` of a stream's rows: the short conv's input channels and the gates,
        from q and the rows' k | v | extra projections (extra: the beta and decay columns)."""
        k, v, extra = proj.split([self.key_dim, self.value_dim, proj.shape[-1] - self.key_dim - self.value_dim], dim=-1)
        return torch.cat([q, k, v], dim=-1), *self._gates(extra)

    def _split_qkv(self, qkv: torch.Tensor):
        """The short conv's output channels -> `(q, k, v)`."""
        return qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = o.shape[:-1]
        gate = self.g_proj(x).view(*shape, self.num_heads, self.head_v)
        # uncast: the norm computes in at least fp32 and returns the gate's dtype
        o = self.o_norm(o.view(*shape, self.num_heads, self.head_v), gate)
        return self.o_proj(o.reshape(*shape, self.value_dim))

    # ---- training / prefill ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, doc_starts: torch.Tensor | None = None, state: MoMLayerState | None = None,
                valid: torch.Tensor | None = None):
        """Returns `(out [B, T, D], aux_loss, memory_load [E])`; advances `state` in place if given.
        `valid [B, T]` bool leaves padding out of the aux loss and the load."""
        B, T, D = x.shape
        routing = route(self.router(x), self.topk)
        plan = plan_dispatch(routing.indices, self.num_memories, self.shared_mem)
        flat = x.reshape(B * T, D)
        q_tok = self.q_proj(flat)
        reset = None if doc_starts is None else stream_resets(doc_starts, plan, self.shared_mem)
        if self.expert_parallel is not None:
            if state is not None:
                raise ValueError("decoding with a cache runs without expert parallelism; got a layer state under EP")
            o = self.expert_parallel(self, flat, q_tok, plan, reset)
        else:
            o, final, conv_final = self.run_stream(
                flat[plan.token_of_row], q_tok[plan.token_of_row], flat if self.shared_mem else None,
                q_tok if self.shared_mem else None, plan.cu_seqlens, plan.memory_offsets, reset, state,
            )
        if state is not None:
            if doc_starts is not None:  # memories that saw nothing of the last document start it empty
                stale = stale_streams(doc_starts, plan, self.shared_mem)
                final = final.masked_fill(stale[:, None, None, None], 0)
                conv_final = conv_final.masked_fill(stale[:, None, None], 0)
            state.recurrent.copy_(final)
            state.conv.copy_(conv_final)
        R = B * T * self.topk
        out = combine(o[:R], o[R:] if self.shared_mem else None, plan, routing.weights)
        aux, load = load_balance_loss(routing, self.num_memories, valid)
        return self._output(out, x), aux, load

    def run_stream(self, routed_x, routed_q, shared_x, shared_q, cu_seqlens, memory_offsets, reset=None, state=None,
                   varying_rows=False):
        """Projections, short conv and recurrence of one stream of rows.

        The stream is the routed rows (if `routed_x` is given), grouped by memory (`memory_offsets`:
        group ends over the stacked per-memory weights), followed by the shared-memory rows (if
        `shared_x` is given);
        `cu_seqlens` and `reset` describe its segments. `q` comes in precomputed (it is one shared
        projection). Returns `(o [rows, value_dim], final_state, final_conv_state)`, the last two
        None unless `state` gives the initial ones. `varying_rows`: the row count differs from call
        to call (the rows expert parallelism received; see `_linear_recurrence`).
        """
        H, K, V = self.num_heads, self.head_k, self.head_v
        # Its own statement: under EP the memories are an FSDP unit whose call breaks the graph, and
        # the code after a break must resume with nothing but this tensor on the stack (a bound method
        # of a fresh list there would make every call recompile).
        routed = None if routed_x is None else self.memories(routed_x, memory_offsets)
        shared = None if shared_x is None else F.linear(shared_x, self.shared_weight())
        if routed is None or shared is None:
            proj, q = (shared, shared_q) if routed is None else (routed, routed_q)
        else:
            proj, q = torch.cat([routed, shared]), torch.cat([routed_q, shared_q])
        rows = q.shape[0]
        qkv, beta, g = self._conv_input(q, proj)
        reset = None if reset is None else reset[None]
        qkv, conv_final = _short_conv(
            qkv[None], self.conv_weight, cu_seqlens=cu_seqlens, reset=reset,
            initial_state=None if state is None else state.conv, output_final_state=state is not None,
        )
        q, k, v = self._split_qkv(qkv[0])
        o, final = _linear_recurrence(
            q.view(1, rows, H, K), k.view(1, rows, H, K), v.view(1, rows, H, V),
            None if g is None else g.view(1, rows, H), None if beta is None else beta.view(1, rows, H),
            scale=None, initial_state=None if state is None else state.recurrent,
            output_final_state=state is not None, cu_seqlens=cu_seqlens, reset=reset, qk_l2norm=self.qk_l2norm,
            varying_rows=varying_rows,
        )
        return o.view(rows, self.value_dim), final, conv_final

    # ---- decoding ----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, state: MoMLayerState) -> torch.Tensor:
        """One token per row, `x [B, 1, D]`: reads and writes only the k (+1 shared) active states."""
        if self.expert_parallel is not None:  # this rank holds E/ep memories; the routing names all E
            raise ValueError("decoding with a cache runs without expert parallelism; got step() under EP")
        D = self.router.in_features
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != D:
            raise ValueError(f"step takes x of shape [B, 1, {D}], got {tuple(x.shape)}")
        B = x.shape[0]
        E, k_top, H, K, V = self.num_memories, self.topk, self.num_heads, self.head_k, self.head_v
        streams = (E + int(self.shared_mem)) * B  # the state's rows: memory m of sequence b at m*B + b
        if state.recurrent.shape[0] != streams:
            raise ValueError(f"state holds {state.recurrent.shape[0]} streams, {streams} expected for a batch of {B} "
                             f"({E} memories{' + shared' if self.shared_mem else ''}): allocate it for batch size {B}")
        flat = x[:, 0]
        routing = route(self.router(flat), k_top)  # [B, k]
        # Every memory's projection of the token (the weights are read once either way), then pick k.
        proj_all = torch.einsum("bd,eod->beo", flat, self.memories.weight())
        proj = proj_all.gather(1, routing.indices[..., None].expand(B, k_top, proj_all.shape[-1])).reshape(B * k_top, -1)
        index = (routing.indices * B + torch.arange(B, device=x.device)[:, None]).reshape(-1)
        q_tok = self.q_proj(flat)
        q = q_tok.repeat_interleave(k_top, dim=0)
        if self.shared_mem:
            proj = torch.cat([proj, F.linear(flat, self.shared_weight())])
            q = torch.cat([q, q_tok])
            index = torch.cat([index, E * B + torch.arange(B, device=x.device)])
        qkv, beta, g = self._conv_input(q, proj)
        q, k, v = self._split_qkv(_short_conv_step(qkv, self.conv_weight, state.conv, index))
        rows = q.shape[0]
        o = _linear_recurrence_step(
            q.view(rows, H, K), k.view(rows, H, K), v.view(rows, H, V), g, beta, state.recurrent, index,
            qk_l2norm=self.qk_l2norm,
        ).reshape(rows, self.value_dim)
        out = (o[: B * k_top].view(B, k_top, -1) * routing.weights[..., None].to(o.dtype)).sum(1)
        if self.shared_mem:
            out = out + o[B * k_top :]
        return self._output(out[:, None], x)
