"""`MoMTrainer`: torchtitan's `Trainer`, which `python -m momtitan.train` (and so `run_train.sh`) runs.

One change: the parallelism degrees are checked against expert parallelism's layout as soon as
torchtitan has made its `ParallelDims` from them, before anything builds the device mesh from them
(`momtitan.parallel.expert_parallel.check_expert_parallel_mesh`).
"""

from __future__ import annotations

from torchtitan.distributed import ParallelDims
from torchtitan.train import Trainer

from momtitan.parallel.expert_parallel import check_expert_parallel_mesh


class MoMTrainer(Trainer):
    def init_distributed(self) -> ParallelDims:
        parallel_dims = super().init_distributed()  # the process group; the mesh is built at first use
        check_expert_parallel_mesh(parallel_dims)
        return parallel_dims
