"""Float8 training through torchtitan's converter (`--model.converters quantize.linear.float8`).

torchtitan's converter swaps every `nn.Linear` whose dims are multiples of 16 for torchao's
`Float8Linear`, except modules whose FQN contains one of `quantize.linear.float8.filter_fqns`.
MoM keeps two kinds of linear in high precision, added to that list automatically:
- the router (`...mixer.router`): its logits pick the top-k memories, and a float8 rounding
  there changes which memory a token goes to, not just a value;
- the LM head (`output`): the logits feed a softmax over the vocabulary, where float8's error is
  largest relative to the signal (torchtitan's MX recipe skips it by default for the same reason).
The per-memory k/v/beta/decay projections are batched parameters `[E, out, D]`, not `nn.Linear`.
torchtitan's second converter, `quantize.grouped_mm.float8` (torchao's MoE training prototype),
makes them float8 in the grouped GEMMs: its FQN list defaults to `memories` here, and the k/v
grouped GEMMs then pad each memory's rows to a multiple of 16, as torchao's kernels need
(`align_memory_groups`). beta and decay (H columns per memory) are a dense GEMM and stay bf16.
"""

from __future__ import annotations

import torch.nn as nn

from momtitan.layers.mom import MemoryProjections

FLOAT8_CONVERTER = "quantize.linear.float8"
GROUPED_FLOAT8_CONVERTER = "quantize.grouped_mm.float8"
ALWAYS_HIGH_PRECISION = ("router", "output")
MEMORY_FQN = "memories"  # MoMLayer.memories: the MemoryProjections module
FLOAT8_GROUP_ALIGNMENT = 16


def float8_enabled(job_config) -> bool:
    return FLOAT8_CONVERTER in job_config.model.converters


def grouped_float8_enabled(job_config) -> bool:
    return GROUPED_FLOAT8_CONVERTER in job_config.model.converters


def add_default_float8_filters(job_config) -> None:
    """Append the router and LM head to the float8 filter list (in place) when float8 is on."""
    if grouped_float8_enabled(job_config):
        section = job_config.quantize.grouped_mm.float8
        if not section.fqns:
            section.fqns = [MEMORY_FQN]
    if not float8_enabled(job_config):
        return
    fqns = job_config.quantize.linear.float8.filter_fqns
    for name in ALWAYS_HIGH_PRECISION:
        if name not in fqns:
            fqns.append(name)


def align_memory_groups(model: nn.Module, job_config) -> int:
    """Under float8 grouped GEMMs, pad each memory's rows to a multiple of 16 in every MoM layer.
    Returns the alignment set (1: unchanged)."""
    if not grouped_float8_enabled(job_config):
        return 1
    for module in model.modules():
        if isinstance(module, MemoryProjections):
            module.group_alignment = FLOAT8_GROUP_ALIGNMENT
    return FLOAT8_GROUP_ALIGNMENT
