"""torchtitan's view of the model arguments: a flavor of `MoMModelArgs` plus the run's changes.

`MoMTitanArgs.update_from_config` is torchtitan's hook between parsing the job config and building
the model. It rebuilds the arguments from the named flavor each time (so a second trainer in the
same process does not inherit the first one's changes), then applies, in order: the `[mom]`
section's overrides, the vocabulary size from the tokenizer, and the sequence length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch.nn as nn
from torchtitan.protocols.model import BaseModelArgs

from momtitan.config import FLAVORS, MoMModelArgs, get_flavor
from momtitan.checks import require_positive_int

VOCAB_MULTIPLE = 64


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


@dataclass
class MoMTitanArgs(BaseModelArgs):
    flavor: str = "debug"
    model: MoMModelArgs = field(default_factory=lambda: get_flavor("debug"))

    def update_from_config(self, job_config, **kwargs) -> None:
        from momtitan.parallel.float8 import GROUPED_FLOAT8_CONVERTER, add_default_float8_filters, grouped_float8_enabled
        from momtitan.train.tokenizer import tokenizer_vocab_size

        overrides = {}
        section = getattr(job_config, "mom", None)
        if section is not None:
            overrides = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
        if "attn_layers" in overrides:
            overrides["attn_layers"] = tuple(overrides["attn_layers"])

        seq_len = job_config.training.seq_len
        require_positive_int("training.seq_len", seq_len)

        base = get_flavor(self.flavor)
        if job_config.training.dataset == "mqar":  # token ids are the task's own, not the tokenizer's
            vocab = job_config.mqar.vocab_size
        else:
            vocab = tokenizer_vocab_size(job_config)
        if "vocab_size" in overrides:
            if vocab is not None and overrides["vocab_size"] < vocab:
                raise ValueError(
                    f"mom.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab})"
                )
        elif vocab is not None:
            overrides["vocab_size"] = _round_up(vocab, VOCAB_MULTIPLE)
        overrides["max_seq_len"] = max(base.max_seq_len, seq_len)

        try:
            self.model = base.replace(**overrides)  # validates; derives the MLP width again if it must
        except TypeError as e:  # a wrong type that the dataclass itself rejects
            raise ValueError(f"invalid [mom] override: {e}") from e

        ep = job_config.parallelism.expert_parallel_degree
        if ep > 1:
            from momtitan.parallel.expert_parallel import check_expert_parallel_degree

            check_expert_parallel_degree(self.model.num_memories, ep)
            if grouped_float8_enabled(job_config):
                raise ValueError(
                    f"model.converters {GROUPED_FLOAT8_CONVERTER!r} together with expert_parallel_degree={ep} is not "
                    "supported yet (the float8 memory weights are not sharded over ep); drop one of the two"
                )
        add_default_float8_filters(job_config)

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        from momtitan.model import get_nparams_and_flops

        return get_nparams_and_flops(self.model, model, seq_len)


def titan_flavors() -> dict[str, MoMTitanArgs]:
    return {name: MoMTitanArgs(flavor=name, model=get_flavor(name)) for name in FLAVORS}


def build_model(args: MoMTitanArgs) -> nn.Module:
    """`TrainSpec.model_cls`: torchtitan calls it with the args, under a meta-device context."""
    from momtitan.model import MoMTransformer

    return MoMTransformer(args.model)
