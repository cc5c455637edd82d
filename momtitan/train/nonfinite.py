"""`--debug.nonfinite_probe`: stop a run at the first forward that produces a NaN or an infinity, and
name the module that produced it first.

torchtitan logs a NaN loss and trains on (every later step is NaN too, and checkpoints save NaN
weights). With the probe on, forward hooks record on the device, with no host sync, the first
module in call order whose output is not finite: the token embeddings, each block, each MoM
block's mixer and MLP (where the block runs eagerly, as one module: a compiled or checkpoint-wrapped
block is probed as a whole, since hooks inside its graph would be traced into it), the final norm and
the output projection. After each forward of the whole model one read of that record (one sync per
micro-batch) raises `FloatingPointError` naming the module and the forward's number. A NaN that first
appears in the gradients shows up at the next forward, in the module whose weights it reached.
"""

from __future__ import annotations

import torch
from torch import nn

from momtitan.model import Block, MoMTransformer


def probed_modules(model: MoMTransformer) -> list[tuple[str, nn.Module]]:
    """The modules the probe watches, in the order a forward calls them."""
    out = [("tok_embeddings", model.tok_embeddings)]
    for name, block in model.layers.items():
        out.append((f"layers.{name}", block))
        if isinstance(block, Block):  # eager: its parts too (a compiled or wrapped block is not a Block)
            out += [(f"layers.{name}.{part}", getattr(block, part)) for part in ("mixer", "mlp")]
    out.append(("norm", model.norm))
    if model.output is not None:
        out.append(("output", model.output))
    return out


class NonFiniteProbe:
    """Forward hooks on `probed_modules(model)` and a check after the model's forward (see the module
    docstring). `remove()` takes the hooks off."""

    def __init__(self, model: MoMTransformer):
        if not isinstance(model, MoMTransformer):
            raise TypeError(f"model must be a MoMTransformer, got {type(model).__name__}")
        modules = probed_modules(model)
        self.names = [name for name, _ in modules]
        self.first = None  # int32 scalar on the model's device: index of the first non-finite output, or -1
        self.forwards = 0
        self.handles = [module.register_forward_hook(self._record(i)) for i, (_, module) in enumerate(modules)]
        self.handles.append(model.register_forward_hook(self._check))

    def _record(self, index: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            if self.first is None:
                self.first = torch.full((), -1, dtype=torch.int32, device=out.device)
            bad = ~torch.isfinite(out.detach()).all()
            self.first.copy_(torch.where((self.first < 0) & bad, index, self.first))
        return hook

    def _check(self, module, args, output):
        self.forwards += 1
        if self.first is None:
            return
        index = int(self.first.item())
        if index >= 0:
            raise FloatingPointError(f"non-finite values first in the output of {self.names[index]} "
                                     f"(forward {self.forwards}; --debug.nonfinite_probe)")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
