"""Generation with the recurrent cache: an eager prefill, then a compiled one-token decode step.

    prefill   model(prompt, doc_starts, cache)          forwards over the (left-padded) prompts, in
                                                        chunks of `prefill_chunk_size` tokens if set
    decode    model.decode_step(token, cache) + sample  compiled once: fixed shapes, the cache
                                                        updated in place, sampling on the device

On CUDA the decode step is compiled with mode "reduce-overhead" (CUDA graphs). The cache tensors
are marked as static addresses, so the graph reads and writes them in place, and the random
numbers for sampling come from a device generator: no host sync per token. The host looks at the
tokens only to stream them (if asked) and, every `sync_every` steps, to stop early once every row
has produced its end-of-sequence token.

Chunked prefill: each chunk continues from the cache the previous one left, so the result equals one
forward over the whole prompt, while the activations held at once are those of one chunk: the peak
memory of a long prompt stays flat in its length (the recurrent state is fixed-size; attention
layers, if any, still grow their KV cache).

Left padding: a prompt's padding is a separate "document" before the prompt (`doc_starts` marks
the first real token). The MoM layers restart every memory and conv window there and zero the
streams that only saw padding, and attention layers do not look across it, so padding never
touches the state the prompt leaves behind.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from momtitan.cache import AttentionLayerState, MoMLayerState, ModelCache
from momtitan.model import MoMTransformer
from momtitan.checks import require_positive_int


def padding_doc_starts(attention_mask: torch.Tensor, *, allow_right_padding: bool = True) -> torch.Tensor | None:
    """`doc_starts` that isolate the padding of a `[B, T]` 0/1 attention mask, or None without padding.

    Each row must be one run of ones: left padding, or (if `allow_right_padding`) right padding,
    whose positions come after every real token and so cannot change them. Holes raise ValueError.
    This looks at the mask on the host (one sync per call): call it once per prompt, not per token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    starts = mask & ~F.pad(mask, (1, 0))[:, :-1]
    if bool((starts.sum(1) > 1).any()):
        raise ValueError("attention_mask must hold one run of ones per row (left or right padding), not holes")
    if not allow_right_padding and has_right_padding(mask):
        raise ValueError("right padding cannot be used with a cache (the padding would enter the state); pad on the left")
    return starts


def has_right_padding(attention_mask: torch.Tensor) -> bool:
    """Whether a row of a `[B, T]` 0/1 attention mask ends in padding after a real token (one host sync)."""
    mask = attention_mask.bool()
    return bool((~mask[:, -1] & mask.any(1)).any())


def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's inductor `mode` records CUDA graphs on CUDA ("reduce-overhead" and
    "max-autotune" do; None, inductor's default mode, does not)."""
    import torch._inductor

    return mode is not None and torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens `[B]` from `logits [B, V]`: argmax if `temperature == 0`, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens (0: all) and the top_p nucleus.

    The draw is Gumbel-max over `uniform [B, V]` (uniform in [0, 1)), so it has no host sync and
    is a pure function of its inputs: eager and compiled code draw the same tokens.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if uniform is None:
        raise ValueError("sampling (temperature > 0) needs the uniform noise")
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) > top_p  # keeps the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=-1)


@torch.no_grad()
def prefill(model: MoMTransformer, input_ids: torch.Tensor, cache: ModelCache, *, doc_starts: torch.Tensor | None = None,
            chunk_size: int | None = None) -> torch.Tensor:
    """Run the prompts `input_ids [B, T]` into `cache`, `chunk_size` tokens at a time (None: all at
    once) -> the last position's logits `[B, vocab]` (no logits are computed for the other positions)."""
    T = input_ids.shape[1]
    if T == 0:
        raise ValueError(f"prefill needs at least one token, got input_ids of shape {tuple(input_ids.shape)}")
    if chunk_size is not None:
        require_positive_int("chunk_size", chunk_size)
    step = T if chunk_size is None else chunk_size
    logits = None
    for start in range(0, T, step):
        end = min(start + step, T)
        chunk_starts = None if doc_starts is None else doc_starts[:, start:end]
        logits = model(input_ids[:, start:end], doc_starts=chunk_starts, cache=cache, logits_to_keep=1).logits
    return logits[:, -1]


def _cache_tensors(cache: ModelCache):
    yield cache.position
    for layer in cache.layers:
        if isinstance(layer, MoMLayerState):
            yield from (layer.recurrent, layer.conv)
        elif isinstance(layer, AttentionLayerState):
            yield from (layer.k, layer.v, layer.doc)


def _decode_and_sample(model: MoMTransformer, tokens: torch.Tensor, cache: ModelCache, uniform: torch.Tensor | None,
                       temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = model.decode_step(tokens, cache)[:, -1].float()
    return sample_tokens(logits, temperature, top_k, top_p, uniform)


class Generator:
    """Prefill + compiled decoding for a `MoMTransformer` (eval mode, no grad).

    `compile`: None compiles on CUDA only. `mode` defaults to "reduce-overhead" (CUDA graphs) on
    CUDA; `backend` defaults to inductor. One compiled step serves every call with the same batch
    size and sampling settings, and its cache is reused by the next call that fits in it.
    """

    def __init__(self, model: MoMTransformer, *, compile: bool | None = None, mode: str | None = None,
                 backend: str = "inductor"):
        if not isinstance(model, MoMTransformer):
            raise ValueError(f"Generator wraps a MoMTransformer, got {type(model).__name__}")
        self.model = model
        device = next(model.parameters()).device
        self.compiled = device.type == "cuda" if compile is None else compile
        if self.compiled and mode is None and device.type == "cuda":
            mode = "reduce-overhead"
        self.cuda_graphs = self.compiled and device.type == "cuda" and uses_cuda_graphs(mode)
        if self.compiled:
            self._step = torch.compile(_decode_and_sample, mode=mode, backend=backend, fullgraph=True, dynamic=False)
        else:
            self._step = _decode_and_sample
        self._cache: tuple | None = None  # (key, ModelCache): reused so CUDA graphs see the same addresses

    def _fresh_cache(self, batch_size: int, max_len: int, device, dtype) -> ModelCache:
        """A zeroed cache; the previous call's if it fits (same tensors, zeroed in place)."""
        if self._cache is not None:
            (b, length, dev, dt), cache = self._cache
            if b == batch_size and length >= max_len and dev == device and dt == dtype:
                for t in _cache_tensors(cache):
                    t.zero_()
                return cache
        cache = ModelCache.allocate(self.model.args, batch_size, device=device, dtype=dtype, max_len=max_len)
        if self.cuda_graphs:
            for t in _cache_tensors(cache):
                torch._dynamo.mark_static_address(t)
        self._cache = ((batch_size, max_len, device, dtype), cache)
        return cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        sync_every: int = 32,
        prefill_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Generate up to `max_new_tokens` tokens per row -> `[B, n]` (n < max_new_tokens only if
        every row ended early). After a row's `eos_token_id`, it gets `pad_token_id` (default: eos).
        `streamer(tokens [B])` is called with each step's tokens (on the host: one sync per token).
        `prefill_chunk_size`: feed the prompt that many tokens at a time (bounds its peak memory)."""
        model = self.model
        if model.training:
            raise ValueError("generate needs the model in eval mode (call model.eval())")
        require_positive_int("max_new_tokens", max_new_tokens)
        require_positive_int("sync_every", sync_every)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] with T > 0, got shape {tuple(input_ids.shape)}")
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        input_ids = input_ids.to(device)
        B, T = input_ids.shape
        doc_starts = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
            doc_starts = padding_doc_starts(attention_mask.to(device), allow_right_padding=False)

        cache = self._fresh_cache(B, T + max_new_tokens, device, dtype)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

        def noise():
            if temperature == 0:
                return None
            return torch.rand(B, model.args.vocab_size, device=device, generator=generator)

        logits = prefill(model, input_ids, cache, doc_starts=doc_starts, chunk_size=prefill_chunk_size).float()
        token = sample_tokens(logits, temperature, top_k, top_p, noise())

        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        current = torch.empty(B, 1, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        fill = eos_token_id if pad_token_id is None else pad_token_id
        steps = max_new_tokens
        for i in range(max_new_tokens):
            if eos_token_id is not None:
                token = torch.where(finished, fill, token)
                finished |= token == eos_token_id
            out[:, i] = token
            current.copy_(token[:, None])
            if streamer is not None:
                streamer(token.cpu())
            if i + 1 == max_new_tokens:
                break
            if eos_token_id is not None and (i + 1) % sync_every == 0 and bool(finished.all()):
                steps = i + 1
                break
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._step(model, current, cache, noise(), temperature, top_k, top_p).clone()
        return out[:, :steps]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, compile: bool | None = None, **kwargs) -> torch.Tensor:
    """One-shot `Generator(model, compile=compile).generate(...)`; accepts a `MoMForCausalLM` too."""
    inner = getattr(model, "model", model)
    return Generator(inner, compile=compile).generate(input_ids, max_new_tokens, **kwargs)
