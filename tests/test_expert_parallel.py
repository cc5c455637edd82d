"""Expert parallelism over 2 CPU processes (gloo) against the same model without it."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_ep_equivalence(*flags: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/distributed/ep_equivalence.py"), *flags]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("flags, exchanges", [([], 10), (["--ac", "op"], 10), (["--ac", "full"], 16)],
                         ids=["no_ac", "sac_op", "full_ac"])
def test_ep2_matches_ep1_logits_and_gradients(flags, exchanges):
    """Also counts the all-to-alls (ep_equivalence fails on a wrong count): 5 per layer and step, none
    of them in per-op SAC's recompute, which replays the exchanges' saved outputs; full AC recomputes
    the forward's three."""
    out = run_ep_equivalence(*flags)
    # each rank reports its logits, its gradient check and its all-to-all count once
    assert len(re.findall(r"rank \d logits rel err", out)) == 2, out
    assert len(re.findall(r"gradients checked: \d+, mismatches: none", out)) == 2, out
    assert len(re.findall(rf"all-to-alls in the step: {exchanges}, expected {exchanges}", out)) == 2, out


@pytest.mark.parametrize("flags", [["--compile", "aot_eager"], ["--compile", "aot_eager", "--ac", "op"],
                                   ["--compile", "aot_eager_decomp_partition", "--ac", "memory_budget"]],
                         ids=["no_ac", "sac_op", "memory_budget"])
def test_compiled_ep_blocks_match_and_compile_the_routed_rows(flags):
    """Blocks compiled as under EP training: three steps on new routings equal the eager model without
    EP, the exchange's graphs compile at most twice (static, then a dynamic row count), and the routed
    rows' projections and recurrence run inside a compiled graph, not eagerly around it; also when
    the blocks are checkpointed per op (a checkpoint traced around the exchanges' graph breaks would
    leave the whole block eager), and under the compiler's memory budget (its partitioner, which
    sizes every graph input, meets the memories' DTensor meshes)."""
    out = run_ep_equivalence(*flags)
    assert len(re.findall(r"gradients checked: \d+, mismatches: none", out)) == 6, out
    assert len(re.findall(r"compiled graphs: \d+, routed rows compiled: True", out)) == 2, out


def _dims(dp_replicate: int, dp_shard: int, ep: int):
    from torchtitan.distributed import ParallelDims

    return ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=1, tp=1, pp=1, ep=ep, etp=1,
                        world_size=dp_replicate * dp_shard)


def test_bad_degrees_are_rejected_with_their_values():
    from momtitan.parallel.expert_parallel import check_expert_parallel_degree, check_expert_parallel_mesh

    with pytest.raises(ValueError, match=r"num_memories \(3\) must be divisible by expert_parallel_degree, got 2"):
        check_expert_parallel_degree(3, 2)
    check_expert_parallel_degree(4, 2)
    # ep 4 divides the world (replicate 2 x shard 2) but not dp_shard: torchtitan's efsdp would be 2 // 4 = 0
    dims = _dims(dp_replicate=2, dp_shard=2, ep=4)
    with pytest.raises(ValueError, match=r"parallelism.expert_parallel_degree \(4\) x expert_tensor_parallel_degree "
                                         r"\(1\) must divide data_parallel_shard_degree \(2\) x "
                                         r"context_parallel_degree \(1\) x tensor_parallel_degree \(1\) = 2"):
        check_expert_parallel_mesh(dims)
    assert not dims._meshes  # checked without a mesh
    check_expert_parallel_mesh(_dims(dp_replicate=2, dp_shard=2, ep=2))
    check_expert_parallel_mesh(_dims(dp_replicate=2, dp_shard=1, ep=1))


def test_trainer_checks_the_degrees_before_the_mesh_is_built(monkeypatch):
    """`MoMTrainer.init_distributed` (what `python -m momtitan.train` runs) rejects the degrees as soon as
    torchtitan has made its ParallelDims, before anything builds a mesh from them."""
    from torchtitan.train import Trainer

    from momtitan.train.trainer import MoMTrainer

    dims = _dims(dp_replicate=2, dp_shard=2, ep=4)
    monkeypatch.setattr(Trainer, "init_distributed", lambda self: dims)
    with pytest.raises(ValueError, match=r"expert_parallel_degree \(4\)"):
        MoMTrainer.init_distributed(object.__new__(MoMTrainer))
    assert not dims._meshes


def test_memories_shard_on_their_rows_when_efsdp_outnumbers_them():
    """FSDP shards an ep rank's E/ep memories on dim 0 while every efsdp rank gets at least one, and on
    dim 1 (each memory's rows) past that, where dim 0 would leave ranks holding only padding."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Shard

    from momtitan.parallel.parallelize import memories_shard_placement

    def mesh(*sizes):  # (dp_replicate,) efsdp
        return SimpleNamespace(ndim=len(sizes), size=lambda dim: sizes[dim])

    assert memories_shard_placement(mesh(2), local_memories=2) is None
    assert memories_shard_placement(mesh(4, 2), local_memories=2) is None  # dp_replicate does not count
    placement = memories_shard_placement(mesh(4), local_memories=2)
    assert placement(torch.nn.Parameter(torch.zeros(2, 3, 4))) == Shard(1)


SAC_OP = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]
COMPILE_AOT = ["--compile.enable", "--compile.backend", "aot_eager"]


@pytest.mark.parametrize("extra_flags", [[], SAC_OP, COMPILE_AOT + SAC_OP], ids=["eager", "eager_sac_op", "compiled_sac_op"])
def test_run_train_with_expert_parallel_on_two_cpu_ranks(tmp_path, extra_flags):
    """The torchtitan path: ep=2 over 2 gloo ranks trains, and the loss falls; also with the 340M and
    1.3B recipes' per-op selective AC (the memories' FSDP unit sits inside each checkpointed block)
    and compiled. Compiled (FSDP units, the exchanges' graph breaks, a new routing every step), no
    code object reaches dynamo's recompile limit (past it, dynamo would quietly run that code eagerly)."""
    env = dict(os.environ, NGPU="2", PYTHON=sys.executable, LOG_RANK="0,1")  # both ranks in the log
    cmd = ["./run_train.sh", "--job.config_file", "train_configs/mom_debug.toml",
           "--parallelism.expert_parallel_degree", "2", "--training.steps", "12", "--training.local_batch_size", "4",
           "--checkpoint.no-enable", "--job.dump_folder", str(tmp_path), "--metrics.log_freq", "1", *extra_flags]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "recompile_limit" not in out, out[out.index("recompile_limit") - 2000 :][:4000]
    assert "Applied expert parallelism: 2 ranks" in out and re.search(r"ranks0: \[0\.\d\d 0\.\d\d\]", out), out[-3000:]
    a2a = [float(x) for x in re.findall(r"a2a: ([\d.]+)ms \([\d.]+%\)", out)]
    assert len(a2a) >= 12 and all(t > 0 for t in a2a), out[-3000:]
    rank0 = "\n".join(line for line in re.sub(r"\x1b\[[0-9;]*m", "", out).splitlines() if line.startswith("[rank0]"))
    losses = [float(x) for x in re.findall(r"step:\s+\d+\s+loss:\s+([\d.]+)", rank0)]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses


def test_comm_timer_accumulates_and_resets():
    from momtitan.parallel.comm_timer import CommTimer

    timer = CommTimer()
    for _ in range(2):
        with timer.measure(torch.device("cpu")):
            time.sleep(0.01)
    assert 0.02 <= timer.pop_seconds() < 1.0
    assert timer.pop_seconds() == 0.0
