"""AdamW/Adam with two parameter groups: weight decay on matrices, none on the rest.

No decay on: the memories' decay parameters `A_log` and `dt_bias`, every norm's weight (any
module whose class name contains "Norm", including the gated output norm) and every bias. This is
what fla's models mark `_no_weight_decay` plus the usual bias/norm exclusion of the HF Trainer
that the paper's recipe ran on. Embeddings, projections, conv weights and the LM head decay.

The container is torchtitan's `OptimizersContainer` (one optimizer per model part, state dicts by
parameter FQN for DCP); only the construction of each optimizer differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

NO_DECAY_PARAM_NAMES = frozenset({"A_log", "dt_bias", "bias"})


def split_by_decay(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decayed, not decayed) trainable parameters by FQN; a shared parameter counts once."""
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            fqn = f"{module_name}.{name}" if module_name else name
            (no_decay if is_norm or name in NO_DECAY_PARAM_NAMES else decay)[fqn] = p
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = split_by_decay(model)
    logger.info(
        f"Weight decay {weight_decay} on {len(decay)} tensors; none on {len(no_decay)} "
        f"(A_log, dt_bias, norms, biases)"
    )
    groups = [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class MoMOptimizersContainer(OptimizersContainer):
    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type[Optimizer], optimizer_kwargs: dict[str, Any]):
        self.model_parts = model_parts
        self.optimizers = []
        all_params = []
        for model in model_parts:
            groups = param_groups(model, optimizer_kwargs["weight_decay"])
            for g in groups:
                all_params.extend(g["params"])
            self.optimizers.append(optimizer_cls(groups, **optimizer_kwargs))
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)


OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def build_optimizers(model_parts: list[nn.Module], optimizer_config, parallel_dims, ft_manager=None) -> OptimizersContainer:
    """`TrainSpec.build_optimizers_fn`."""
    name = optimizer_config.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {name!r} is not supported; choose one of {sorted(OPTIMIZERS)}")
    if optimizer_config.early_step_in_backward:
        raise ValueError("optimizer.early_step_in_backward is not supported by momtitan (it skips grad clipping)")
    impl = optimizer_config.implementation
    if impl not in ("fused", "foreach", "for-loop"):
        raise ValueError(f"optimizer.implementation must be fused, foreach or for-loop, got {impl!r}")
    on_cpu = all(p.device.type == "cpu" for m in model_parts for p in m.parameters())
    if impl == "fused" and on_cpu:
        impl = "foreach"  # the fused kernels are accelerator-only
    for field in ("lr", "eps", "weight_decay"):
        value = getattr(optimizer_config, field)
        if value < 0:
            raise ValueError(f"optimizer.{field} must be >= 0, got {value}")
    kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        "fused": impl == "fused",
        "foreach": impl == "foreach",
    }
    return MoMOptimizersContainer(model_parts, OPTIMIZERS[name], kwargs)
