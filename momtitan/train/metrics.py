"""Logging: torchtitan's metrics (loss, grad norm, tokens/s, TFLOPS, MFU, memory) plus MoM's own.

MoM adds, at each logging step: the cross entropy and the aux loss separately (torchtitan's "loss"
is their weighted sum), each MoM layer's token share per memory, and on CPU the process's peak RSS
(torchtitan's memory monitor reads zeros there). They go to the console and, when
`--metrics.enable_tensorboard` is set, to TensorBoard under loss_metrics/, memory_load/, memory/.
The statistics come from the loss function (`momtitan.train.loss`), summed over data-parallel
ranks here, at logging steps only; they cover all training steps since the previous log, where
torchtitan's loss is the logging step's alone. Under expert parallelism it also logs the share of
tokens each ep rank runs and the time in the all-to-alls (`momtitan.parallel.comm_timer`: this
rank's, per training step since the last log or validation, and as a share of that time), under
time_metrics/.
"""

from __future__ import annotations

import re
import resource
import sys
import time

import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from momtitan.parallel.comm_timer import ALL_TO_ALL
from momtitan.train import loss as loss_module


class MoMMetricsProcessor(MetricsProcessor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._steps_in_window = 0  # training steps since the last log (or validation)

    def should_log(self, step: int) -> bool:
        # torchtitan's trainer asks once per training step, so the steps are counted here (a resumed
        # run's first step is not 1, so `step` alone does not tell how many ran)
        self._steps_in_window += 1
        return super().should_log(step)

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = dict(extra_metrics or {})
        extra.update(self._mom_metrics())
        if self.parallel_dims.ep > 1:
            window = time.perf_counter() - self.time_last_log  # what torchtitan divides by too
            a2a = ALL_TO_ALL.pop_seconds()
            extra["time_metrics/all_to_all(s)"] = a2a / self._steps_in_window
            extra["time_metrics/all_to_all(%)"] = 100 * a2a / window
        if self.device_memory_monitor.device.type == "cpu":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            extra["memory/cpu_max_rss(GiB)"] = rss / (1 << 30 if sys.platform == "darwin" else 1 << 20)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        self._print_mom(step, extra)
        self._steps_in_window = 0

    def log_validation(self, loss, step, extra_metrics=None):
        super().log_validation(loss, step, extra_metrics)
        # torchtitan starts its timing window again after a validation: so does the all-to-all's,
        # dropping the validation forwards' exchanges with it
        ALL_TO_ALL.pop_seconds()
        self._steps_in_window = 0

    def _mom_metrics(self) -> dict[str, float]:
        stats = loss_module.latest_stats
        if stats is None:
            return {}
        sums = stats.pop()
        if sums is None:
            return {}
        mesh = self.parallel_dims.get_optional_mesh("loss") if self.parallel_dims.dp_cp_enabled else None
        if mesh is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=mesh.get_group())
        metrics = stats.summarize(sums, stats.load_shape, stats.layer_ids)
        ep = self.parallel_dims.ep
        if ep > 1:  # under expert parallelism: the share of routed rows each ep rank runs
            layers, memories = stats.load_shape
            for layer in stats.layer_ids or range(layers):
                shares = [metrics[f"memory_load/layer{layer}/mem{m}"] for m in range(memories)]
                per_rank = memories // ep
                for r in range(ep):
                    metrics[f"memory_load/layer{layer}/ep_rank{r}"] = sum(shares[r * per_rank : (r + 1) * per_rank])
        return metrics

    def _print_mom(self, step: int, metrics: dict[str, float]) -> None:
        if "loss_metrics/ce_loss" not in metrics:
            return
        parts = [f"ce: {metrics['loss_metrics/ce_loss']:.5f}", f"aux: {metrics['loss_metrics/aux_loss']:.4f}"]
        layers = sorted(int(m.group(1)) for key in metrics if (m := re.fullmatch(r"memory_load/layer(\d+)/mem0", key)))
        for layer in layers:  # block indices (hybrid models skip the attention blocks)
            parts.append(f"load{layer}: [{_series(metrics, f'memory_load/layer{layer}/mem')}]")
            if f"memory_load/layer{layer}/ep_rank0" in metrics:
                parts.append(f"ranks{layer}: [{_series(metrics, f'memory_load/layer{layer}/ep_rank')}]")
        if "time_metrics/all_to_all(s)" in metrics:
            parts.append(f"a2a: {1e3 * metrics['time_metrics/all_to_all(s)']:.1f}ms "
                         f"({metrics['time_metrics/all_to_all(%)']:.1f}%)")
        if "memory/cpu_max_rss(GiB)" in metrics:
            parts.append(f"rss: {metrics['memory/cpu_max_rss(GiB)']:.2f}GiB")
        logger.info(f"step: {step:2}  " + "  ".join(parts))


def _series(metrics: dict[str, float], prefix: str) -> str:
    """`prefix0, prefix1, ...` while present, formatted as space-separated shares."""
    values, i = [], 0
    while f"{prefix}{i}" in metrics:
        values.append(f"{metrics[f'{prefix}{i}']:.2f}")
        i += 1
    return " ".join(values)


def build_metrics_processor(job_config, parallel_dims, model_args=None, tag: str | None = None) -> MoMMetricsProcessor:
    """`TrainSpec.build_metrics_processor_fn`."""
    return MoMMetricsProcessor(job_config, parallel_dims, tag)
