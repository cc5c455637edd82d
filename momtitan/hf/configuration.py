"""`MoMConfig`: the Hugging Face configuration of a momtitan model.

Its fields are `MoMModelArgs`' fields, under the names flash-linear-attention's `MomConfig` uses
where the concept is the same (only `max_seq_len` is spelled `max_position_embeddings`). The
field list, the defaults and the validation all come from `MoMModelArgs`: `CONFIG_NAMES` is the one
mapping between the two, used in both directions.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from momtitan.config import MoMModelArgs

# MoMModelArgs field -> config attribute, where the two spell it differently.
_RENAMED = {"max_seq_len": "max_position_embeddings"}
CONFIG_NAMES: dict[str, str] = {f.name: _RENAMED.get(f.name, f.name) for f in dataclasses.fields(MoMModelArgs)}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoMModelArgs)}
assert all(v is not dataclasses.MISSING for v in _DEFAULTS.values()), "MoMModelArgs fields need plain defaults"


class MoMConfig(PretrainedConfig):
    model_type = "momtitan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, pad_token_id: int | None = None, use_cache: bool = True, **kwargs):
        for field, name in CONFIG_NAMES.items():
            value = kwargs.pop(name, _DEFAULTS[field])
            setattr(self, name, list(value or ()) if field == "attn_layers" else value)  # None: no attention layers
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        super().__init__(**kwargs)
        # Validate now (a bad config.json fails on load, naming the field) and store derived values
        # (the MLP width) explicitly, so config.json says exactly what the weights are.
        self.intermediate_size = self.to_model_args().intermediate_size

    def to_model_args(self) -> MoMModelArgs:
        values = {field: getattr(self, name) for field, name in CONFIG_NAMES.items()}
        values["attn_layers"] = tuple(values["attn_layers"] or ())
        return MoMModelArgs(**values)

    @classmethod
    def from_model_args(cls, args: MoMModelArgs, **kwargs) -> "MoMConfig":
        values = {CONFIG_NAMES[field]: value for field, value in args.to_dict().items()}
        return cls(**values, **kwargs)
