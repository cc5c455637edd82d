"""Expert parallelism over 2 CPU processes (gloo) against the same model without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ep2_matches_ep1_logits_and_gradients():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/distributed/ep_equivalence.py")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    report = [line for line in result.stdout.splitlines() if line.startswith("rank")]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(report) == 4 and all("mismatches: none" in line for line in report if "gradients" in line), report


def test_bad_degrees_are_rejected_with_their_values():
    from momtitan.parallel.expert_parallel import check_expert_parallel_degree

    with pytest.raises(ValueError, match=r"num_memories \(3\) must be divisible by expert_parallel_degree, got 2"):
        check_expert_parallel_degree(3, 2, world_size=2)
    with pytest.raises(ValueError, match=r"expert_parallel_degree 3 must divide the world size 4"):
        check_expert_parallel_degree(6, 3, world_size=4)
    check_expert_parallel_degree(4, 2, world_size=4)
