"""Float8 training through torchtitan's converter (`--model.converters quantize.linear.float8`).

torchtitan's converter swaps every `nn.Linear` whose dims are multiples of 16 for torchao's
`Float8Linear`, except modules whose FQN contains one of `quantize.linear.float8.filter_fqns`.
MoM keeps three kinds of linear in high precision, added to that list automatically (and to
`quantize.linear.mx.filter_fqns` under the MX converter, which swaps by the same rule):
- the router (`...mixer.router`): its logits pick the top-k memories, and a float8 rounding
  there changes which memory a token goes to, not just a value;
- the LM head (`output`): the logits feed a softmax over the vocabulary, where float8's error is
  largest relative to the signal (torchtitan's MX recipe skips it by default for the same reason);
- the shared memory's projections (`shared_k`, `shared_v`, `shared_b`, `shared_a`): the layer never
  calls these modules, it concatenates their weights into one GEMM (`MoMLayer.shared_weight`), so a
  float8 swap would not run as float8, and with FSDP's float8 all-gather the concatenation of
  differently scaled float8 weights fails.
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
MX_CONVERTER = "quantize.linear.mx"
ALWAYS_HIGH_PRECISION = ("router", "output", "shared_")  # FQN substrings
MEMORY_FQN = "memories"  # MoMLayer.memories: the MemoryProjections module
FLOAT8_GROUP_ALIGNMENT = 16


def grouped_float8_enabled(job_config) -> bool:
    return GROUPED_FLOAT8_CONVERTER in job_config.model.converters


def add_default_float8_filters(job_config) -> None:
    """Append `ALWAYS_HIGH_PRECISION` to the float8 (and MX) linear converters' filter lists (in
    place) when they are on; the grouped float8 converter defaults to the memories."""
    if grouped_float8_enabled(job_config):
        section = job_config.quantize.grouped_mm.float8
        if not section.fqns:
            section.fqns = [MEMORY_FQN]
    converters = job_config.model.converters
    for converter, section in ((FLOAT8_CONVERTER, job_config.quantize.linear.float8),
                               (MX_CONVERTER, job_config.quantize.linear.mx)):
        if converter in converters:
            section.filter_fqns.extend(name for name in ALWAYS_HIGH_PRECISION if name not in section.filter_fqns)


def align_memory_groups(model: nn.Module, job_config) -> int:
    """Under float8 grouped GEMMs, pad each memory's rows to a multiple of 16 in every MoM layer.
    Returns the alignment set (1: unchanged)."""
    if not grouped_float8_enabled(job_config):
        return 1
    for module in model.modules():
        if isinstance(module, MemoryProjections):
            module.group_alignment = FLOAT8_GROUP_ALIGNMENT
    return FLOAT8_GROUP_ALIGNMENT
