"""The `[mom]` TOML section: per-run overrides of the model flavor's fields.

torchtitan merges this `JobConfig` into its own when `job.custom_config_module` names this module
(the TOMLs in train_configs/ and run_train.sh do). Every field defaults to None, meaning "keep the
flavor's value"; a set value replaces that field of `momtitan.config.MoMModelArgs`, and the result
is validated before the model is built. On the command line: `--mom.num_memories 8`,
`--mom.attn_layers 3 7`.
"""


from dataclasses import dataclass, field


@dataclass
class MoM:
    vocab_size: int | None = None
    """Vocabulary size. Unset: the tokenizer's size (rounded up to a multiple of 64)."""
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    expand_v: float | None = None
    num_memories: int | None = None
    topk: int | None = None
    shared_mem: bool | None = None
    memory_rule: str | None = None
    """One of gated_delta, delta, gated, linear."""
    conv_size: int | None = None
    aux_loss_scale: float | None = None
    """Weight of the load-balancing loss added to the cross entropy (paper: 0.01 or 0.001)."""
    hidden_ratio: float | None = None
    intermediate_size: int | None = None
    attn_layers: list[int] | None = None
    """Layer indices that use softmax attention instead of MoM (hybrid models)."""
    attn_num_heads: int | None = None
    attn_num_kv_heads: int | None = None
    norm_eps: float | None = None
    tie_word_embeddings: bool | None = None


@dataclass
class MQAR:
    """The `[mqar]` section: the recall task read by `--training.dataset mqar` (and
    `--validation.dataset mqar`). The model's vocabulary is set to `vocab_size`."""

    vocab_size: int = 512
    num_kv_pairs: int = 8
    power_a: float = 0.01


@dataclass
class Debug:
    """Merged into torchtitan's `[debug]` section."""

    nonfinite_probe: bool = False
    """Stop at the first forward whose output holds a NaN or an infinity and name the module that
    produced it first (`momtitan.train.nonfinite`; one host sync per forward)."""


@dataclass
class JobConfig:
    mom: MoM = field(default_factory=MoM)
    mqar: MQAR = field(default_factory=MQAR)
    debug: Debug = field(default_factory=Debug)
