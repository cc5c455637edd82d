"""The training loss: summed cross entropy plus the MoM load-balancing term.

torchtitan calls `loss_fn(pred, labels)` with `pred` the model output and divides what it returns
by the number of valid label tokens in the global batch. So that the aux term keeps its weight
after that division, it is multiplied by this micro-batch's valid-token count:

    loss_fn = CE_sum + aux_loss_scale * aux_loss * n_valid
    loss    = loss_fn / N_global  = mean CE + aux_loss_scale * (token-weighted mean of aux_loss)

`aux_loss` is the model's unscaled load-balance loss (mean over MoM layers; equal to topk when the
load is balanced), as in fla's MoM (Switch-style, coefficient 0.01 in the paper's configs).

The loss object also keeps detached statistics of the last training micro-batches (CE, aux,
per-layer memory load) for `momtitan.train.metrics` to log; it records nothing under no_grad
(validation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum", ignore_index=IGNORE_INDEX
    )


class RouterStats:
    """Sums of detached per-micro-batch statistics since the last `pop()`, kept on the device so
    that recording them costs no host sync; `pop()` returns them as one flat vector."""

    def __init__(self, layer_ids: tuple[int, ...] | None = None) -> None:
        self.sums: torch.Tensor | None = None  # [tokens, ce_sum, aux*tokens, micro-batches, load...]
        self.load_shape: tuple[int, ...] = (0, 0)
        # the model's index of each load row's layer (hybrid models: the MoM blocks only); None: 0, 1, ...
        self.layer_ids = layer_ids

    def add(self, ce_sum: torch.Tensor, aux: torch.Tensor, n_valid: torch.Tensor, load: torch.Tensor | None) -> None:
        n = n_valid.detach().float()
        head = torch.stack([n, ce_sum.detach().float(), aux.detach().float() * n, torch.ones_like(n)])
        if load is not None and load.numel():
            self.load_shape = tuple(load.shape)
            row = torch.cat([head, load.detach().float().flatten()])
        else:
            row = head
        self.sums = row if self.sums is None or self.sums.shape != row.shape else self.sums + row

    def pop(self) -> torch.Tensor | None:
        sums, self.sums = self.sums, None
        return sums

    @staticmethod
    def summarize(sums: torch.Tensor, load_shape: tuple[int, ...],
                  layer_ids: tuple[int, ...] | None = None) -> dict[str, float]:
        """Means from (possibly all-reduced) sums: CE and aux per token, memory share per layer, each
        named by its block index in the model (`layers.N`)."""
        values = sums.double().cpu()
        tokens, ce, aux_w, batches = (float(v) for v in values[:4])
        out = {
            "loss_metrics/ce_loss": ce / max(tokens, 1.0),
            "loss_metrics/aux_loss": aux_w / max(tokens, 1.0),
        }
        if values.numel() > 4:
            load = (values[4:] / max(batches, 1.0)).view(load_shape)
            for layer, row in zip(layer_ids or range(len(load)), load):
                for m, share in enumerate(row.tolist()):
                    out[f"memory_load/layer{layer}/mem{m}"] = share
                out[f"memory_load/layer{layer}/max_share"] = float(row.max())
        return out


class MoMLoss:
    """`loss_fn(pred, labels)`; `pred` is a `MoMOutput` (logits, aux_loss, memory_load) or bare logits."""

    def __init__(self, aux_loss_scale: float, compile_ce: bool = False, backend: str = "inductor",
                 layer_ids: tuple[int, ...] | None = None) -> None:
        self.aux_loss_scale = float(aux_loss_scale)
        self.ce = torch.compile(cross_entropy_sum, backend=backend) if compile_ce else cross_entropy_sum
        self.stats = RouterStats(layer_ids)

    def __call__(self, pred, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.ce(pred, labels)
        ce_sum = self.ce(pred.logits, labels)
        n_valid = (labels != IGNORE_INDEX).sum()
        aux = pred.aux_loss
        loss = ce_sum + (self.aux_loss_scale * aux.float() * n_valid) if self.aux_loss_scale else ce_sum
        if torch.is_grad_enabled():
            self.stats.add(ce_sum, aux, n_valid, getattr(pred, "memory_load", None))
        return loss


latest_stats: RouterStats | None = None  # the last-built loss's statistics, read by the metrics processor


def build_loss_fn(job_config, **kwargs) -> MoMLoss:
    """`TrainSpec.build_loss_fn`. The aux scale comes from the model args after the [mom] overrides."""
    from momtitan.train.spec import current_model_args

    args = current_model_args(job_config)
    compile_ce = job_config.compile.enable and "loss" in job_config.compile.components
    if compile_ce:
        logger.info("Compiling the cross-entropy part of the loss with torch.compile")
    mom_layers = tuple(i for i in range(args.num_hidden_layers) if i not in args.attn_layers)
    loss = MoMLoss(args.aux_loss_scale, compile_ce=compile_ce, backend=job_config.compile.backend, layer_ids=mom_layers)
    global latest_stats
    latest_stats = loss.stats
    return loss
