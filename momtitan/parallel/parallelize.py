"""`parallelize_mom(model, parallel_dims, job_config)`: torchtitan's `TrainSpec.parallelize_fn`.

The same recipe as torchtitan's llama3, applied to `MoMTransformer`'s blocks, in this order:
1. activation checkpointing per block (`full`, or `selective`: every n-th block or per op);
2. `torch.compile(block, fullgraph=True)` per block (`--compile.enable`);
3. data parallelism: FSDP2 `fully_shard` per block, on the embeddings and on the final norm + head,
   then on the root, with `MixedPrecisionPolicy(param_dtype=training.mixed_precision_param,
   reduce_dtype=training.mixed_precision_reduce)`; HSDP when `data_parallel_replicate_degree > 1` as
   well; DDP when only replicating.
Expert parallelism (`parallelism.expert_parallel_degree = ep`, borrowed from dp_shard) comes first:
each MoM layer's memories are sharded over the `ep` mesh and its routed rows travel by all-to-all
(`momtitan.parallel.expert_parallel`); FSDP then shards the memories over the `efsdp` mesh (the
rest of dp_shard; under HSDP with `dp_replicate` in front) and everything else over the full `fsdp`
mesh. Under EP the all-to-alls (their split sizes are data) make three graph breaks per MoM layer,
so blocks compile with `fullgraph=False`, and steps 1 and 2 swap (`apply_ac_and_compile` says why).
Tensor and context parallelism are not implemented for MoM and are refused here with a ValueError.
Pipeline parallelism never gets here: the TrainSpec has no `pipelining_fn`, and torchtitan's trainer
stops first ("RuntimeError: Pipeline Parallel is enabled but mom does not support pipelining").

Gradients: torchtitan divides the loss by the global token count itself, so FSDP's own gradient
division is switched off (divide factor 1), and DDP's averaging is replaced by a plain sum. FSDP on CPU (gloo) needs two more changes, made by
`momtitan.train.cpu_shims.prepare_fsdp_on_cpu`: plain-SUM reductions and per-rank init seeds.
"""

from __future__ import annotations

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.tools.logging import logger

import momtitan.parallel.exchange_ops  # noqa: F401  (registers the exchange ops named in SAC_SAVE_OPS)
from momtitan.parallel.float8 import align_memory_groups


def _recurrence_forward_op() -> set:
    """The Triton recurrence's forward op (its registration imports triton; none without triton).
    Kept by SAC, it is not rerun in the recompute: the recompute needs only its output `o` (for the
    output norm and the combine's backward), and its own backward recomputes its intermediates from
    its inputs anyway. Rerunning it cost a whole chunked forward, the layer's costliest op, per step."""
    try:
        import momtitan.ops.triton.recurrence_op  # noqa: F401
    except ImportError:
        return set()
    return {torch.ops.momtitan.linear_recurrence_fwd.default}


# Ops whose outputs selective (per-op) activation checkpointing keeps instead of recomputing.
# Every second matmul is recomputed anyway (torchtitan's policy); the rest are expensive to redo.
SAC_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,  # float8 scales come from abs-max
    # expert parallelism's exchanges: the recompute replays them instead of communicating (and
    # waiting for the host) again
    torch.ops.momtitan.ep_exchange_counts.default,
    torch.ops.momtitan.ep_all_to_all_rows.default,
    *_recurrence_forward_op(),  # the recurrence's output: the recompute does not rerun its forward
}


def sac_skips_profiler_ranges() -> None:
    """Leave profiler ranges out of per-op selective checkpointing's replay.

    SAC replays the forward's ops in the recompute and checks each op's count against the forward's.
    FSDP's hooks open `record_function` ranges, and an FSDP unit inside a checkpointed block (expert
    parallelism gives the memories their own unit) opens a different number of them in the recompute,
    so the first backward fails ("profiler._record_function_enter_new.default invocation index ...
    not found in storage"; torchtitan#3427, fixed upstream the same way in pytorch#196862). The
    ranges compute nothing, so SAC may skip them (a torch without `SAC_IGNORED_OPS` is left as it is).
    """
    ignored = getattr(torch.utils.checkpoint, "SAC_IGNORED_OPS", None)
    if ignored is not None:
        ignored.update({torch.ops.profiler._record_function_enter_new.default,
                        torch.ops.profiler._record_function_exit._RecordFunction})


def prepare_memory_budget(expert_parallel: bool, inductor_on_cpu: bool) -> None:
    """Two things the compiler's memory-budget checkpointing (`activation_checkpoint.mode =
    "memory_budget"`: the partitioner picks what each compiled graph recomputes) needs here.

    - Under EP, the graphs that project the routed rows take the memories' DTensor weights, and their
      device meshes enter the joint graph as opaque script objects, which the partitioner refuses to
      size ("Cannot compute the size of ... FakeScriptObject"). A mesh holds no tensor, so counting
      it as zero bytes is exact here.
    - On CPU, inductor's vectorized C++ kernels for the recomputing backward corrupt the heap
      (seen with torch 2.13: "corrupted double-linked list" in a fused backward kernel of a MoM
      block; aot_eager with the same partition, and the same kernels unvectorized, run correctly;
      upstream's inductor CPU heap-corruption reports, e.g. pytorch#181689, are the same kind).
      CPU runs are for debugging, so the kernels are generated scalar there.
    """
    if expert_parallel and hasattr(torch._functorch.config, "unsafe_treat_script_objects_as_zero_size"):
        torch._functorch.config.unsafe_treat_script_objects_as_zero_size = True  # (a torch without it has no such check)
    if inductor_on_cpu:
        logger.warning("memory_budget with inductor on CPU: scalar C++ kernels (torch._inductor.config.cpp.simdlen = 1), "
                       "as the vectorized ones of the recomputing backward corrupt the heap")
        torch._inductor.config.cpp.simdlen = 1


def _check_supported(parallel_dims) -> None:
    for name, enabled in (
        ("tensor_parallel_degree", parallel_dims.tp_enabled),
        ("context_parallel_degree", parallel_dims.cp_enabled),
    ):
        if enabled:
            raise ValueError(f"parallelism.{name} > 1 is not supported for the MoM model; use FSDP/HSDP/DDP")


def apply_compile(model: nn.Module, backend: str, fullgraph: bool = True, mode: str | None = None) -> None:
    """Compile each block on its own: the blocks are alike, so one compilation serves them all.
    `mode` is inductor's (e.g. "reduce-overhead": each block's graphs replayed as CUDA graphs)."""
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=fullgraph, mode=mode))
    logger.info(f"Compiled each MoM block with torch.compile (backend {backend}, fullgraph={fullgraph}, mode {mode})")


def apply_ac_and_compile(model: nn.Module, ac, *, compile_backend=None, expert_parallel: bool = False,
                         base_folder: str = "") -> None:
    """Activation checkpointing (`ac`, torchtitan's config; mode "none" skips it) and per-block
    compile (`compile_backend`, a name or a callable; None skips it), in the order that keeps the
    blocks compiled.

    Without expert parallelism a block is one graph: it is checkpointed first, then compiled with
    `fullgraph=True`, and the compiler applies the checkpoint policy inside the graph. Under EP the
    exchanges break each block's graph, and dynamo cannot trace a checkpoint whose body breaks: it
    falls back to running the whole checkpointed block eagerly, compiling nothing.
    So under EP each block is compiled first (`fullgraph=False`) and the compiled block is
    checkpointed: per-op SAC then sees the ops that reach the dispatcher, the exchanges among them
    (replayed from the forward: `SAC_SAVE_OPS`), and recomputes the compiled pieces.
    """
    if ac.mode not in ("none", "full", "selective", "memory_budget"):
        raise ValueError(f"activation_checkpoint.mode must be none/full/selective/memory_budget, got {ac.mode!r}")
    if ac.mode == "memory_budget" and compile_backend is None:
        raise ValueError("activation_checkpoint.mode 'memory_budget' needs --compile.enable")
    if ac.mode == "selective" and not (ac.selective_ac_option == "op" or ac.selective_ac_option.isdigit()):
        raise ValueError(
            f"activation_checkpoint.selective_ac_option must be 'op' or a layer frequency, got {ac.selective_ac_option!r}"
        )
    if ac.mode == "selective" and ac.selective_ac_option == "op":
        sac_skips_profiler_ranges()
    if ac.mode == "memory_budget":
        prepare_memory_budget(expert_parallel, inductor_on_cpu=compile_backend == "inductor"
                              and not torch.accelerator.is_available())

    def checkpoint():
        if ac.mode != "none":
            apply_ac(model, ac, model_compile_enabled=compile_backend is not None, op_sac_save_list=SAC_SAVE_OPS,
                     base_folder=base_folder)

    if not expert_parallel:
        checkpoint()
    if compile_backend is not None:
        apply_compile(model, compile_backend, fullgraph=not expert_parallel)
    if expert_parallel:
        checkpoint()


def memories_shard_placement(memories_mesh, local_memories: int):
    """FSDP's `shard_placement_fn` for an ep rank's `local_memories` (E/ep) stacked memories: None
    (dim 0, one block of memories per efsdp rank) unless efsdp has more ranks than there are memories,
    where dim 0 would leave some ranks only padding; then dim 1 (each memory's output rows), as
    torchtitan's llama4 shards its experts."""
    if memories_mesh.size(memories_mesh.ndim - 1) <= local_memories:  # the last dim is efsdp
        return None
    return lambda param: Shard(1)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               cpu_offload: bool, reshard_policy: str, memories_mesh=None) -> None:
    """`memories_mesh`: under expert parallelism, the mesh that shards each MoM layer's memories,
    which are already split over ep: efsdp, with dp_replicate in front under HSDP (so that the
    replicas' memory gradients are summed too); they get their own FSDP unit first, on the dim
    `memories_shard_placement` picks."""
    if reshard_policy not in ("default", "always", "never"):
        raise ValueError(f"parallelism.fsdp_reshard_after_forward must be default/always/never, got {reshard_policy!r}")
    reshard = reshard_policy != "never"
    config = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()

    tied = model.output is None
    if not tied:  # a tied head reads the embedding weight at the end, so it stays with the root
        fully_shard(model.tok_embeddings, **config, reshard_after_forward=reshard)
    for block in model.layers.values():
        if memories_mesh is not None and hasattr(block.mixer, "memories"):
            placement = memories_shard_placement(memories_mesh, block.mixer.expert_parallel.local_memories)
            fully_shard(block.mixer.memories, **{**config, "mesh": memories_mesh}, reshard_after_forward=reshard,
                        shard_placement_fn=placement)
        fully_shard(block, **config, reshard_after_forward=reshard)
    if not tied:
        # the last unit runs backward first, so keeping it gathered after forward saves a gather
        fully_shard([model.norm, model.output], **config, reshard_after_forward=reshard_policy == "always")
    fully_shard(model, **config)

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
    if mesh.device_type == "cpu":
        from momtitan.train.cpu_shims import prepare_fsdp_on_cpu

        prepare_fsdp_on_cpu(model, shard_rank=mesh.get_local_rank(mesh.ndim - 1))


def _allreduce_sum_hook(group, bucket):
    """DDP comm hook: sum gradients without DDP's division by the world size."""
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, mesh, compiled: bool) -> None:
    from torch.distributed._composable.replicate import replicate

    if compiled:
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    replicate(model, device_mesh=mesh, bucket_cap_mb=100)
    # the loss is already divided by the global token count: DDP must sum, not average
    model.register_comm_hook(mesh.get_group(), _allreduce_sum_hook)


def parallelize_mom(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    _check_supported(parallel_dims)
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if parallel_dims.ep_enabled:
        from momtitan.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, parallel_dims.get_mesh("ep"))
        logger.info(f"Applied expert parallelism: {parallel_dims.ep} ranks share each layer's memories")
    alignment = align_memory_groups(model, job_config)
    if alignment > 1:
        logger.info(f"float8 grouped GEMMs on the memories: each memory's rows padded to a multiple of {alignment}")

    apply_ac_and_compile(
        model, job_config.activation_checkpoint,
        compile_backend=job_config.compile.backend if compile_model else None,
        expert_parallel=parallel_dims.ep_enabled, base_folder=job_config.job.dump_folder,
    )

    training = job_config.training
    if parallel_dims.fsdp_enabled:
        replicate = ["dp_replicate"] if parallel_dims.dp_replicate_enabled else []
        apply_fsdp(
            model, parallel_dims.get_mesh(replicate + ["fsdp"]),
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            cpu_offload=training.enable_cpu_offload,
            reshard_policy=job_config.parallelism.fsdp_reshard_after_forward,
            memories_mesh=parallel_dims.get_mesh(replicate + ["efsdp"]) if parallel_dims.ep_enabled else None,
        )
        logger.info("Applied HSDP to the model" if parallel_dims.dp_replicate_enabled else "Applied FSDP to the model")
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), compile_model)
        logger.info("Applied DDP to the model")
    return model
