"""Hugging Face integration: `MoMConfig`, `MoMForCausalLM` (registered with the Auto classes as
model_type "momtitan"), and conversion to and from torchtitan DCP checkpoints and fla's format.

    import momtitan.hf
    model = AutoModelForCausalLM.from_pretrained(folder)
"""

from transformers import AutoConfig, AutoModelForCausalLM

from momtitan.hf.configuration import MoMConfig
from momtitan.hf.modeling import MoMCache, MoMCausalLMOutputWithPast, MoMForCausalLM, MoMPreTrainedModel

AutoConfig.register(MoMConfig.model_type, MoMConfig, exist_ok=True)
AutoModelForCausalLM.register(MoMConfig, MoMForCausalLM, exist_ok=True)

__all__ = ["MoMConfig", "MoMForCausalLM", "MoMPreTrainedModel", "MoMCache", "MoMCausalLMOutputWithPast"]
