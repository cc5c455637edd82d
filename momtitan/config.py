"""Model arguments and the named flavors, validated on construction.

Field names follow flash-linear-attention's `MomConfig` wherever the concept is the same, so a
config moves between momtitan, the Hugging Face classes and fla without renaming.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from momtitan.checks import require_positive_int

# memory rule -> (its update decays the state with a gate g, it is a delta rule with a rate beta)
RULE_INPUTS = {"gated_delta": (True, True), "delta": (False, True), "gated": (True, False), "linear": (False, False)}
MEMORY_RULES = tuple(RULE_INPUTS)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _derived_intermediate_size(hidden_size: int, hidden_ratio: float) -> int:
    """The MLP width when `intermediate_size` is not given (fla's rule): 2/3 of hidden_size *
    hidden_ratio, rounded up to a multiple of 256."""
    if isinstance(hidden_ratio, bool) or not isinstance(hidden_ratio, (int, float)) or not hidden_ratio > 0:
        raise ValueError(f"hidden_ratio must be a positive number, got {hidden_ratio!r}")
    return _round_up(int(hidden_size * hidden_ratio * 2 / 3), 256)


@dataclass
class MoMModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    # memories
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    num_memories: int = 4
    topk: int = 2
    shared_mem: bool = True
    memory_rule: str = "gated_delta"
    qk_l2norm: bool = True
    conv_size: int = 4
    aux_loss_scale: float = 0.01
    # feed-forward
    hidden_ratio: float = 4.0
    intermediate_size: int | None = None
    # hybrid: softmax attention at these layer indices
    attn_layers: tuple[int, ...] = ()
    attn_num_heads: int = 16
    attn_num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # the rest
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        layers = self.attn_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"attn_layers must be a sequence of layer indices, got {layers!r}")
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in layers):
            raise TypeError(f"attn_layers must hold integer layer indices, got {layers!r}")
        self.attn_layers = tuple(int(i) for i in layers)
        if self.intermediate_size is None:
            self.intermediate_size = _derived_intermediate_size(self.hidden_size, self.hidden_ratio)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "num_memories",
                    "topk", "conv_size", "intermediate_size", "attn_num_heads", "max_seq_len")
        for name in positive:
            require_positive_int(name, getattr(self, name))
        if self.conv_size < 2:
            raise ValueError(f"conv_size must be an integer >= 2, got {self.conv_size!r}")
        if self.memory_rule not in MEMORY_RULES:
            raise ValueError(f"memory_rule must be one of {MEMORY_RULES}, got {self.memory_rule!r}")
        if self.topk > self.num_memories:
            raise ValueError(f"topk must be <= num_memories ({self.num_memories}), got topk={self.topk}")
        if self.expand_v <= 0 or (self.head_dim * self.expand_v) != int(self.head_dim * self.expand_v):
            raise ValueError(f"expand_v must be positive and make head_dim*expand_v whole, got {self.expand_v!r}")
        if not self.aux_loss_scale >= 0:  # NaN fails too
            raise ValueError(f"aux_loss_scale must be >= 0, got {self.aux_loss_scale!r}")
        for i in self.attn_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"attn_layers must hold layer indices in [0, {self.num_hidden_layers}), got {self.attn_layers}")
        if self.attn_num_kv_heads is not None:
            require_positive_int("attn_num_kv_heads", self.attn_num_kv_heads)
        kv_heads = self.attn_num_kv_heads or self.attn_num_heads
        if self.attn_num_heads % kv_heads or self.hidden_size % self.attn_num_heads:
            raise ValueError(
                f"attn_num_heads ({self.attn_num_heads}) must divide hidden_size ({self.hidden_size}) and be a "
                f"multiple of attn_num_kv_heads, got attn_num_kv_heads={self.attn_num_kv_heads!r}"
            )
        if self.attn_layers and (self.hidden_size // self.attn_num_heads) % 2:
            raise ValueError(f"the attention head size hidden_size / attn_num_heads must be even (rotary embedding "
                             f"rotates pairs), got {self.hidden_size} / {self.attn_num_heads}")
        if not 0 < self.rope_theta < math.inf:
            raise ValueError(f"rope_theta must be positive and finite, got {self.rope_theta!r}")
        if not 0 < self.norm_eps < math.inf:
            raise ValueError(f"norm_eps must be positive and finite, got {self.norm_eps!r}")

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def uses_decay(self) -> bool:
        return RULE_INPUTS[self.memory_rule][0]

    @property
    def uses_delta(self) -> bool:
        return RULE_INPUTS[self.memory_rule][1]

    def replace(self, **changes) -> "MoMModelArgs":
        """A copy with `changes`, validated. Changing hidden_size or hidden_ratio derives the MLP
        width again (as construction does), unless `changes` sets intermediate_size too."""
        if "hidden_size" in changes or "hidden_ratio" in changes:
            changes.setdefault("intermediate_size", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attn_layers"] = list(self.attn_layers)
        return d


# The paper's 340M ("380M" in v4) and 1.3B configs (training/configs/mom_{340M,1.3B}.json), and a tiny
# one for tests and CPU runs.
FLAVORS: dict[str, MoMModelArgs] = {
    "debug": MoMModelArgs(
        vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, num_memories=4, topk=2,
        hidden_ratio=2.0, intermediate_size=128, attn_num_heads=4, max_seq_len=512, tie_word_embeddings=False,
    ),
    "340M": MoMModelArgs(hidden_size=1024, num_hidden_layers=24, hidden_ratio=3.0),
    "1.3B": MoMModelArgs(hidden_size=2048, num_hidden_layers=24, hidden_ratio=4.0),
}


def get_flavor(name: str) -> MoMModelArgs:
    if name not in FLAVORS:
        raise ValueError(f"unknown flavor {name!r}; known flavors: {sorted(FLAVORS)}")
    return dataclasses.replace(FLAVORS[name])
