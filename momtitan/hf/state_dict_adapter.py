"""momtitan <-> flash-linear-attention (`fla.models.MomForCausalLM`, model_type "mom"): weights and config.

Weights, per layer i (fla prefix `model.layers.{i}.`, ours `layers.{i}.`):

    ours                                  fla
    tok_embeddings.weight                 model.embeddings.weight
    layers.i.mixer_norm.weight            attn_norm.weight
    layers.i.mlp_norm.weight              mlp_norm.weight
    layers.i.mlp.{gate,up,down}_proj      mlp.{gate,up,down}_proj
    layers.i.mixer.router.weight          attn.gate.weight
    layers.i.mixer.memories.{k,v,b,a}_proj [E,o,D]  attn.{k,v,b,a}_proj.{m}.weight [o,D]   (one per memory)
    layers.i.mixer.conv_weight [C,W]      attn.{q,k,v}_conv1d.weight [c,1,W]      (C = key|key|value)
    layers.i.mixer.<q_proj, shared_k/v/b/a, g_proj, o_norm, o_proj, A_log, dt_bias>   attn.<same>
    norm.weight                           model.norm.weight
    output.weight                         lm_head.weight   (absent with tied embeddings)

Both conv layouts put the current token in the last tap. fla can only represent the model fla
implements: the gated delta rule with q/k L2 norm, the output gate and short conv, no attention
layers; anything else raises ValueError naming the field.
"""

from __future__ import annotations

import re

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from momtitan.config import MoMModelArgs
from momtitan.hf.configuration import CONFIG_NAMES

FLA_MODEL_TYPE = "mom"

# MoMModelArgs fields fla's MomConfig holds under the same meaning (config name from CONFIG_NAMES).
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "expand_v", "num_memories", "topk",
    "shared_mem", "conv_size", "aux_loss_scale", "hidden_ratio", "intermediate_size", "max_seq_len", "norm_eps",
    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
)
# fla MomConfig fields that must hold these values for the weights to mean what ours mean. fla's
# own defaults (used when a key is absent) are these values too.
_FLA_FIXED = {
    "mom_backend": "gated_deltanet", "use_short_conv": True, "use_output_gate": True, "single_kv_proj": False,
    "hidden_act": "swish", "attn": None, "attnres_block_size": None,
}
# fla MomConfig defaults for the shared fields (configuration_mom.py), used when a key is absent.
_FLA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 24, "num_heads": 4, "head_dim": 256,
    "expand_v": 1.0, "num_memories": 4, "topk": 2, "shared_mem": True, "conv_size": 4, "aux_loss_scale": 0.01,
    "hidden_ratio": 4, "intermediate_size": None, "max_position_embeddings": 2048, "norm_eps": 1e-6,
    "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
}


def check_fla_representable(args: MoMModelArgs) -> None:
    """Raise ValueError if fla's MomForCausalLM cannot hold this model."""
    if args.memory_rule != "gated_delta":
        raise ValueError(f"fla's MoM implements only the gated delta rule; memory_rule={args.memory_rule!r} cannot be exported")
    if not args.qk_l2norm:
        raise ValueError("fla's MoM always L2-normalises q and k; qk_l2norm=False cannot be exported")
    if args.attn_layers:
        raise ValueError(
            f"attn_layers={list(args.attn_layers)}: fla's hybrid attention layer differs from momtitan's "
            "(key names, RoPE, norms), so hybrid models cannot be exported to fla"
        )


def fla_config(args: MoMModelArgs, **extra) -> dict:
    """config.json content for `fla.models.MomConfig` (model_type "mom")."""
    check_fla_representable(args)
    values = args.to_dict()
    cfg = {"model_type": FLA_MODEL_TYPE, "architectures": ["MomForCausalLM"], "attn_mode": "chunk"}
    for field in _SHARED_FIELDS:
        cfg[CONFIG_NAMES[field]] = values[field]
    if float(cfg["hidden_ratio"]).is_integer():
        cfg["hidden_ratio"] = int(cfg["hidden_ratio"])
    cfg.update(_FLA_FIXED)
    cfg.update(capacity=1.0, use_cache=True, fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True, pad_token_id=None)
    cfg.update(extra)
    return cfg


def args_from_fla_config(cfg: dict) -> MoMModelArgs:
    """`MoMModelArgs` of an fla MoM config dict; ValueError for what momtitan cannot represent."""
    if cfg.get("model_type") != FLA_MODEL_TYPE:
        raise ValueError(f"not an fla MoM config: model_type={cfg.get('model_type')!r}, expected {FLA_MODEL_TYPE!r}")
    for key, required in _FLA_FIXED.items():
        value = cfg.get(key, required)
        if value != required and not (key == "hidden_act" and value == "silu"):
            raise ValueError(f"fla config has {key}={value!r}; momtitan needs {key}={required!r}")
    values = {}
    for field in _SHARED_FIELDS:
        name = CONFIG_NAMES[field]
        values[field] = cfg.get(name, _FLA_DEFAULTS[name])
    if values["hidden_ratio"] is None:
        values["hidden_ratio"] = 4  # fla's GatedMLP default
    values["hidden_ratio"] = float(values["hidden_ratio"])
    values["expand_v"] = float(values["expand_v"])
    return MoMModelArgs(memory_rule="gated_delta", qk_l2norm=True, **values)


_MIXER_SAME = ("q_proj.weight", "g_proj.weight", "o_proj.weight", "o_norm.weight", "A_log", "dt_bias",
               "shared_k.weight", "shared_v.weight", "shared_b.weight", "shared_a.weight")
_STACKED = ("k_proj", "v_proj", "b_proj", "a_proj")
_MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def to_fla(state_dict: dict[str, torch.Tensor], args: MoMModelArgs) -> dict[str, torch.Tensor]:
    """momtitan `MoMTransformer` state dict -> fla `MomForCausalLM` state dict."""
    check_fla_representable(args)
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(ours: str, theirs: str) -> None:
        if ours not in sd:
            raise ValueError(f"state dict lacks {ours!r} (does it match the config?)")
        out[theirs] = sd.pop(ours)

    move("tok_embeddings.weight", "model.embeddings.weight")
    move("norm.weight", "model.norm.weight")
    if not args.tie_word_embeddings:
        move("output.weight", "lm_head.weight")
    for i in range(args.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        move(ours + "mixer_norm.weight", theirs + "attn_norm.weight")
        move(ours + "mlp_norm.weight", theirs + "mlp_norm.weight")
        for name in _MLP:
            move(ours + "mlp." + name, theirs + "mlp." + name)
        move(ours + "mixer.router.weight", theirs + "attn.gate.weight")
        for name in _MIXER_SAME:
            if name.startswith("shared_") and not args.shared_mem:
                continue
            move(ours + "mixer." + name, theirs + "attn." + name)
        for name in _STACKED:
            move(ours + "mixer.memories." + name, "stacked")
            stacked = out.pop("stacked")
            for m in range(stacked.shape[0]):
                out[f"{theirs}attn.{name}.{m}.weight"] = stacked[m].clone()  # safetensors stores no shared views
        move(ours + "mixer.conv_weight", "conv")
        q, k, v = out.pop("conv").split([args.key_dim, args.key_dim, args.value_dim], dim=0)
        for name, part in zip(("q", "k", "v"), (q, k, v)):
            out[f"{theirs}attn.{name}_conv1d.weight"] = part.unsqueeze(1).clone()
    if sd:
        raise ValueError(f"keys the fla layout has no place for (config mismatch?): {sorted(sd)[:8]}")
    return out


def from_fla(state_dict: dict[str, torch.Tensor], args: MoMModelArgs) -> dict[str, torch.Tensor]:
    """fla `MomForCausalLM` state dict -> momtitan `MoMTransformer` state dict."""
    check_fla_representable(args)
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def take(theirs: str) -> torch.Tensor:
        if theirs not in sd:
            raise ValueError(f"fla state dict lacks {theirs!r} (does it match the config?)")
        return sd.pop(theirs)

    out["tok_embeddings.weight"] = take("model.embeddings.weight")
    out["norm.weight"] = take("model.norm.weight")
    if args.tie_word_embeddings:
        head = sd.pop("lm_head.weight", None)  # a tied checkpoint may store the head anyway
        if head is not None and not torch.equal(head, out["tok_embeddings.weight"]):
            raise ValueError("tie_word_embeddings is set but lm_head.weight differs from model.embeddings.weight")
    else:
        out["output.weight"] = take("lm_head.weight")
    for i in range(args.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[ours + "mixer_norm.weight"] = take(theirs + "attn_norm.weight")
        out[ours + "mlp_norm.weight"] = take(theirs + "mlp_norm.weight")
        for name in _MLP:
            out[ours + "mlp." + name] = take(theirs + "mlp." + name)
        out[ours + "mixer.router.weight"] = take(theirs + "attn.gate.weight")
        for name in _MIXER_SAME:
            if name.startswith("shared_") and not args.shared_mem:
                continue
            out[ours + "mixer." + name] = take(theirs + "attn." + name)
        for name in _STACKED:
            out[ours + "mixer.memories." + name] = torch.stack(
                [take(f"{theirs}attn.{name}.{m}.weight") for m in range(args.num_memories)])
        convs = [take(f"{theirs}attn.{n}_conv1d.weight") for n in ("q", "k", "v")]
        for c in convs:
            if c.dim() != 3 or c.shape[1] != 1:
                raise ValueError(f"fla conv weight of layer {i} must be [C, 1, W], got {tuple(c.shape)}")
        out[ours + "mixer.conv_weight"] = torch.cat([c.squeeze(1) for c in convs], dim=0)
    if sd:
        raise ValueError(f"fla state dict holds keys momtitan has no place for (config mismatch?): {sorted(sd)[:8]}")
    return out


def momtitan_to_hf_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`MoMTransformer` keys -> `MoMForCausalLM` keys (the HF wrapper holds the transformer as `model`)."""
    return {"model." + k: v for k, v in state_dict.items()}


def hf_to_momtitan_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bad = [k for k in state_dict if not k.startswith("model.")]
    if bad:
        raise ValueError(f"MoMForCausalLM keys start with 'model.'; got {bad[:4]}")
    return {k[len("model."):]: v for k, v in state_dict.items()}


class MoMStateDictAdapter(StateDictAdapter):
    """torchtitan's `to_hf` / `from_hf` for momtitan: `fmt` "momtitan" (MoMForCausalLM keys) or "fla"."""

    def __init__(self, model_args, hf_assets_path: str | None = None, fmt: str = "momtitan"):
        super().__init__(model_args, hf_assets_path)
        if fmt not in ("momtitan", "fla"):
            raise ValueError(f"fmt must be 'momtitan' or 'fla', got {fmt!r}")
        self.args = getattr(model_args, "model", model_args)  # MoMTitanArgs wraps MoMModelArgs
        self.fmt = fmt
        if fmt == "fla":
            check_fla_representable(self.args)

    def to_hf(self, state_dict):
        return to_fla(state_dict, self.args) if self.fmt == "fla" else momtitan_to_hf_keys(state_dict)

    def from_hf(self, hf_state_dict):
        return from_fla(hf_state_dict, self.args) if self.fmt == "fla" else hf_to_momtitan_keys(hf_state_dict)


_CHECKPOINT_WRAPPERS = re.compile(r"(_orig_mod\.|_checkpoint_wrapped_module\.|_fsdp_wrapped_module\.)")


def clean_key(key: str) -> str:
    """A state-dict key without torch.compile / activation-checkpoint / FSDP wrapper components."""
    return _CHECKPOINT_WRAPPERS.sub("", key)
