"""`MoMForCausalLM`: the Hugging Face model, a thin wrapper around `momtitan.model.MoMTransformer`.

The wrapper owns no layer code: `self.model` is the same `MoMTransformer` torchtitan trains, so
the weights are `model.<MoMTransformer state_dict key>` and the logits are that model's logits.
With tied embeddings the transformer has no output matrix at all (the head reads the embedding),
so nothing is tied at the HF level and safetensors stores each tensor once.

Generation: `past_key_values` is a `MoMCache`, a small `transformers.Cache` subclass that carries
momtitan's fixed-shape `ModelCache` (recurrent + conv state per memory stream, KV for attention
layers). The first forward of a generation (a prefill) allocates it; later one-token calls go
through `MoMTransformer.decode_step`. Left-padded prompts work: the padding becomes a separate
document before the prompt (see `momtitan.generate.padding_doc_starts`), so it never enters the
state. Beam search reorders the cache rows (`reorder_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from momtitan.cache import AttentionLayerState, ModelCache
from momtitan.config import MoMModelArgs
from momtitan.generate import has_right_padding, padding_doc_starts
from momtitan.hf.configuration import MoMConfig
from momtitan.model import MoMTransformer


class MoMCache(Cache):
    """`past_key_values` of `MoMForCausalLM`: momtitan's `ModelCache` and a host-side count of the
    tokens seen (so no step reads a device scalar to decide prefill vs decode)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: ModelCache, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = seen_tokens

    @classmethod
    def allocate(cls, args: MoMModelArgs, batch_size: int, device=None, dtype=torch.float32, max_len: int | None = None) -> "MoMCache":
        return cls(ModelCache.allocate(args, batch_size, device=device, dtype=dtype, max_len=max_len))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def ensure_capacity(self, length: int) -> None:
        """Grow the attention layers' KV cache to hold `length` positions (MoM state never grows)."""
        for layer in self.state.layers:
            if isinstance(layer, AttentionLayerState) and layer.k.shape[2] < length:
                new_len = max(length, 2 * layer.k.shape[2])
                old_len = layer.k.shape[2]
                k = layer.k.new_zeros(*layer.k.shape[:2], new_len, layer.k.shape[3])
                v = layer.v.new_zeros(k.shape)
                doc = layer.doc.new_zeros(layer.doc.shape[0], new_len)
                k[:, :, :old_len], v[:, :, :old_len], doc[:, :old_len] = layer.k, layer.v, layer.doc
                layer.k, layer.v, layer.doc = k, v, doc

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep and reorder sequences: new row i is old row `rows[i]` (rows may repeat)."""
        B = self.state.batch_size
        for layer in self.state.layers:
            if isinstance(layer, AttentionLayerState):
                for name in ("k", "v", "doc"):
                    t = getattr(layer, name)
                    setattr(layer, name, t.index_select(0, rows.to(t.device)))
            else:  # stream m*B + b: pick b inside each memory's block of B streams
                for name in ("recurrent", "conv"):
                    t = getattr(layer, name)
                    picked = t.view(t.shape[0] // B, B, *t.shape[1:]).index_select(1, rows.to(t.device))
                    setattr(layer, name, picked.reshape(-1, *t.shape[1:]).contiguous())
        self.state.batch_size = rows.numel()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        device = self.state.position.device
        self.select_rows(torch.arange(self.state.batch_size, device=device).repeat_interleave(repeats))


@dataclass
class MoMCausalLMOutputWithPast(CausalLMOutputWithPast):
    aux_loss: torch.FloatTensor | None = None     # load-balance loss (mean over MoM layers, k at balance), unscaled
    memory_load: torch.FloatTensor | None = None  # [MoM layers, E] share of routed rows per memory


class MoMPreTrainedModel(PreTrainedModel):
    config_class = MoMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise with `MoMTransformer.init_weights` (fla's MoM init), keeping every parameter
        transformers has already loaded (flagged `_is_hf_initialized`). transformers' per-module
        walk would skip the transformer (it has no direct parameters) and cannot reach the stacked
        per-memory projections, so the whole model is initialised here in one place."""
        model = self.model
        params = dict(model.named_parameters())
        loaded = {n: p.detach().clone() for n, p in params.items() if getattr(p, "_is_hf_initialized", False)}
        if len(loaded) == len(params):
            return
        model.init_weights()
        for name, value in loaded.items():
            params[name].copy_(value)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """For modules transformers creates on its own (e.g. resized embeddings): normal(0, std)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)


class MoMForCausalLM(MoMPreTrainedModel, GenerationMixin):
    # The loss is a mean over the batch's tokens and forward ignores `num_items_in_batch`: transformers'
    # Trainer must scale it for gradient accumulation itself (it would not, seeing forward's **kwargs).
    accepts_loss_kwargs = False

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.model = MoMTransformer(config.to_model_args())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward allocates a MoMCache on the first call of a generation

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value
        # the vocabulary follows the embedding (resize_token_embeddings): token checks, sampling
        self.model.args = self.model.args.replace(vocab_size=value.num_embeddings)

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.model.output  # None with tied embeddings: the head reads tok_embeddings.weight

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.output = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MoMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ):
        """Logits for `input_ids [B, T]`; with `labels`, loss = next-token cross entropy (labels
        shifted inside, -100 and padded positions ignored) + aux_loss_scale * aux_loss.

        `attention_mask` may hold left padding (or, without a cache, right padding). With
        `use_cache` (default in eval mode, unless the first forward is right-padded) the returned
        `past_key_values` continues the sequences.
        """
        if inputs_embeds is not None:
            raise ValueError("MoMForCausalLM takes input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("MoMForCausalLM does not return attentions or hidden states")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', input_ids)}")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        B, T = input_ids.shape
        cache = past_key_values
        if cache is not None and not isinstance(cache, MoMCache):
            raise ValueError(f"past_key_values must be a MoMCache, got {type(cache).__name__}")
        new = None  # the attention mask's columns of input_ids
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B, >= T] = [{B}, >= {T}], got {tuple(attention_mask.shape)}")
            new = attention_mask[:, -T:]
        if use_cache is None:  # the default: a cache in eval mode, unless right padding would enter it
            use_cache = (self.config.use_cache and not self.training
                         and (cache is not None or new is None or not has_right_padding(new)))
        if cache is None and use_cache:
            cache = MoMCache.allocate(self.model.args, B, device=input_ids.device, dtype=self.dtype, max_len=T + 256)
        fresh = cache is None or cache.seen_tokens == 0

        doc_starts = None
        if new is not None:
            if fresh:
                doc_starts = padding_doc_starts(new, allow_right_padding=cache is None)
            elif not bool(new.bool().all()):  # a host sync per call, decode steps included
                raise ValueError(f"attention_mask has a 0 in its last {T} column(s): padding is only allowed in the "
                                 "first forward of a cache (pad prompts on the left)")

        if cache is not None:
            cache.ensure_capacity(cache.seen_tokens + T)
        if not fresh and T == 1:
            logits = self.model.decode_step(input_ids, cache.state)
            aux, load = None, None
        else:
            valid = None if new is None else new.bool()
            keep = 0 if labels is not None else logits_to_keep
            out = self.model(input_ids, doc_starts=doc_starts, cache=None if cache is None else cache.state,
                             valid=valid, logits_to_keep=keep)
            logits, aux, load = out.logits, out.aux_loss, out.memory_load
        if cache is not None:
            cache.seen_tokens += T

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if attention_mask is not None:
                labels = labels.masked_fill(new.to(labels.device) == 0, -100)
            targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), -100)], dim=1)
            compute = torch.promote_types(logits.dtype, torch.float32)  # fp32 for bf16, fp64 stays
            loss = F.cross_entropy(logits.to(compute).reshape(B * T, -1), targets.reshape(-1), ignore_index=-100)
            if aux is not None:
                loss = loss + self.config.aux_loss_scale * aux
        elif logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]  # the decode step returns one position already

        output = MoMCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None, aux_loss=aux, memory_load=load,
        )
        return output if return_dict else output.to_tuple()
