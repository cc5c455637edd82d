"""The Hugging Face model: save/load, logits and loss, generate (greedy, sampling, beam, left padding)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import momtitan.hf  # noqa: F401  (registers the Auto classes)
from momtitan.config import get_flavor
from momtitan.generate import generate
from momtitan.hf import MoMCache, MoMConfig, MoMForCausalLM
from momtitan.model import MoMTransformer
from tests.conftest import assert_close
from tests.scripts import load_script

VOCAB = 2048


def tiny_hf(**changes) -> MoMForCausalLM:
    args = get_flavor("debug").replace(**changes)
    return MoMForCausalLM(MoMConfig.from_model_args(args)).double().eval()


def greedy_reference(model: MoMTransformer, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens by re-running the full forward on the whole sequence each time."""
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_config_round_trip_and_validation(tmp_path):
    args = get_flavor("debug").replace(attn_layers=(1,), memory_rule="delta", hidden_ratio=3.0, intermediate_size=None)
    config = MoMConfig.from_model_args(args)
    assert config.to_model_args() == args
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "momtitan" and saved["max_position_embeddings"] == args.max_seq_len
    assert saved["intermediate_size"] == args.intermediate_size  # derived width stored explicitly
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoMConfig) and loaded.to_model_args() == args
    with pytest.raises(ValueError, match="topk"):
        MoMConfig(num_memories=2, topk=3)
    with pytest.raises(ValueError, match="memory_rule"):
        MoMConfig(memory_rule="lstm")


@pytest.mark.parametrize("tie,attn_layers", [(False, ()), (True, (1,))])
def test_save_load_round_trip_and_logits_equal_mom_transformer(tmp_path, tie, attn_layers):
    model = tiny_hf(tie_word_embeddings=tie, attn_layers=attn_layers)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())  # each tensor once, MoMForCausalLM keys
    assert ("model.output.weight" in keys) == (not tie)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is MoMForCausalLM
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    inner = MoMTransformer(model.config.to_model_args()).double().eval()
    inner.load_state_dict({k[len("model."):]: v for k, v in model.state_dict().items()})
    tokens = torch.randint(0, VOCAB, (2, 11))
    expected = inner(tokens).logits
    out = loaded(tokens)
    assert_close("logits", out.logits, expected, 1e-12)
    assert out.aux_loss is not None and out.memory_load.shape == (2 - len(attn_layers), 4)


def test_fresh_model_is_initialised_like_mom_transformer():
    model = tiny_hf()
    torch.manual_seed(0)
    fresh = MoMForCausalLM(model.config)
    for name, p in fresh.named_parameters():
        assert torch.isfinite(p).all(), name
    layer = fresh.model.layers["0"].mixer
    assert torch.equal(layer.o_norm.weight, torch.ones_like(layer.o_norm.weight))
    assert (layer.A_log.exp() <= 16).all() and (layer.A_log.exp() > 0).all()
    assert 0.01 < fresh.model.tok_embeddings.weight.std() < 0.03  # normal(0, 0.02)


def test_loss_is_shifted_cross_entropy_plus_scaled_aux():
    model = tiny_hf(aux_loss_scale=0.1)
    tokens = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding in row 1
    labels = tokens.clone()
    labels[0, 4] = -100
    out = model(tokens, attention_mask=mask, labels=labels)
    targets = labels.masked_fill(mask == 0, -100)[:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    assert_close("loss", out.loss, ce + 0.1 * out.aux_loss, 1e-12)
    assert 1.0 < out.aux_loss.item() < 4.0  # k = 2 at perfect balance
    out.loss.backward()
    assert model.model.layers["0"].mixer.router.weight.grad.abs().sum() > 0  # aux loss reaches the router


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_generate_greedy_equals_full_forward_argmax_loop(attn_layers):
    model = tiny_hf(attn_layers=attn_layers)
    prompt = torch.randint(3, VOCAB, (2, 7))
    expected = greedy_reference(model.model, prompt, 6)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, expected)
    no_cache = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0, use_cache=False)
    assert torch.equal(no_cache, expected)


def test_sampling_runs_and_matches_the_uncached_path():
    model = tiny_hf(attn_layers=(1,))
    prompt = torch.randint(3, VOCAB, (3, 5))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50,
                  top_p=0.95, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(1234)
    cached = model.generate(prompt, **kwargs)
    torch.manual_seed(1234)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (3, 13) and torch.equal(cached[:, :5], prompt)
    assert ((cached >= 0) & (cached < VOCAB)).all()
    assert torch.equal(cached, uncached)  # same logits, same draws
    torch.manual_seed(99)
    other = model.generate(prompt, **kwargs)
    assert not torch.equal(other, cached)


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_left_padded_batch_equals_each_row_alone(attn_layers):
    model = tiny_hf(attn_layers=attn_layers)
    lengths = [4, 9, 1]
    prompts = [torch.randint(3, VOCAB, (n,)) for n in lengths]
    T = max(lengths)
    batch = torch.zeros(len(prompts), T, dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=6,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out[i, T:], alone[0, len(p):]), f"row {i} (length {len(p)})"
    # the padded prefill's logits at real positions equal the unpadded forward's
    logits = model(batch, attention_mask=mask, use_cache=False).logits
    for i, p in enumerate(prompts):
        assert_close(f"row {i} logits", logits[i, T - len(p):], model(p[None], use_cache=False).logits[0], 1e-10)


def test_beam_search_with_cache_equals_without():
    model = tiny_hf(attn_layers=(1,))
    prompt = torch.randint(3, VOCAB, (2, 6))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, num_beams=3, do_sample=False,
                  eos_token_id=None, pad_token_id=0, early_stopping=False)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_manual_cache_continuation_and_errors():
    model = tiny_hf(attn_layers=(1,))
    tokens = torch.randint(3, VOCAB, (2, 12))
    full = model(tokens, use_cache=False).logits
    first = model(tokens[:, :5], use_cache=True)
    cache = first.past_key_values
    assert isinstance(cache, MoMCache) and cache.get_seq_length() == 5
    second = model(tokens[:, 5:9], past_key_values=cache)  # multi-token continuation
    steps = [model(tokens[:, t : t + 1], past_key_values=cache).logits for t in range(9, 12)]
    assert_close("continued", torch.cat([first.logits, second.logits, *steps], 1), full, 1e-10)
    assert cache.get_seq_length() == 12

    holes = torch.ones_like(tokens)
    holes[0, 4] = 0
    with pytest.raises(ValueError, match="one run of ones"):
        model(tokens, attention_mask=holes)
    right = torch.ones_like(tokens)
    right[1, -2:] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(tokens, attention_mask=right, use_cache=True)
    model(tokens, attention_mask=right, use_cache=False)  # fine without a cache
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 2, 64))


def test_generate_cli_streams_the_greedy_tokens(tmp_path, capsys):
    """scripts/generate.py on a saved folder (CPU, eager, chunked prefill): it prints the greedy
    continuation token by token."""
    torch.manual_seed(0)
    model = tiny_hf().float()
    model.model.init_weights()
    model.save_pretrained(tmp_path)
    cli = load_script("generate")
    prompt = [5, 17, 300, 42, 9]
    assert cli.main([str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "4", "--no-compile",
                     "--device", "cpu", "--no-eos", "--prefill-chunk", "2"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    expected = greedy_reference(model.model, torch.tensor([prompt]), 4)[0, len(prompt):].tolist()
    assert printed == expected


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings_then_generate(tie):
    model = tiny_hf(tie_word_embeddings=tie).float()
    model.resize_token_embeddings(VOCAB + 52)
    assert model.model.args.vocab_size == model.config.vocab_size == VOCAB + 52
    assert model.model.tok_embeddings.weight.shape[0] == VOCAB + 52
    if not tie:
        assert model.get_output_embeddings().weight.shape[0] == VOCAB + 52
    prompt = torch.tensor([[5, VOCAB + 40, 17]])  # a new token id
    assert model(prompt).logits.shape == (1, 3, VOCAB + 52)
    out = generate(model, prompt, 4, compile=False, temperature=1.0, seed=0)  # noise of the new width
    assert out.shape == (1, 4) and (out < VOCAB + 52).all()


def test_default_cache_is_skipped_for_a_right_padded_forward_and_decode_masks_are_checked():
    model = tiny_hf()
    tokens = torch.randint(3, VOCAB, (2, 8))
    right = torch.ones_like(tokens)
    right[1, -3:] = 0
    out = model(tokens, attention_mask=right)  # eval mode: use_cache defaults to True
    assert out.past_key_values is None
    assert_close("right-padded logits", out.logits, model(tokens, attention_mask=right, use_cache=False).logits, 0)
    left = torch.ones_like(tokens)
    left[1, :2] = 0
    cache = model(tokens, attention_mask=left).past_key_values
    assert isinstance(cache, MoMCache)
    step = torch.randint(3, VOCAB, (2, 1))
    with pytest.raises(ValueError, match=r"attention_mask has a 0 in its last 1 column\(s\)"):
        model(step, attention_mask=torch.cat([left, torch.tensor([[1], [0]])], 1), past_key_values=cache)
    with pytest.raises(ValueError, match=r"cache holds batch size 2, got tokens of batch size 1"):
        model(step[:1], past_key_values=cache)


def test_config_takes_attn_layers_none():
    assert MoMConfig(attn_layers=None).to_model_args().attn_layers == ()


def _stream_with(monkeypatch, capsys, folder, prompt, new_ids):
    """scripts/generate.py's printed text when the generator yields `new_ids` (a stub: the printing
    is under test, not the model)."""
    import momtitan.generate as generation

    def fake_generate(self, input_ids, max_new_tokens, *, streamer=None, **kwargs):
        for t in new_ids:
            streamer(torch.tensor([t]))

    monkeypatch.setattr(generation.Generator, "generate", fake_generate)
    cli = load_script("generate")
    assert cli.main([str(folder), "--prompt", prompt, "--max-new-tokens", str(len(new_ids)), "--no-compile",
                     "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_generate_cli_streams_whole_characters_and_keeps_word_spaces(tmp_path, monkeypatch, capsys):
    """A multi-byte character split over byte tokens used to print as U+FFFD and never be corrected,
    and a tokenizer that marks a word's space in its token (SentencePiece's metaspace) lost the space
    between the prompt and the first new word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    from momtitan.hf.convert import _copy_tokenizer

    model = tiny_hf().float()
    byte_level = tmp_path / "bytes"
    model.save_pretrained(byte_level)
    _copy_tokenizer("builtin", byte_level, model.model.args)
    tok = AutoTokenizer.from_pretrained(str(byte_level))
    text = " café 😀 naïve x"
    out = _stream_with(monkeypatch, capsys, byte_level, "Hi", tok(text, add_special_tokens=False).input_ids)
    assert out == "Hi" + text and "\ufffd" not in out

    meta = tmp_path / "metaspace"
    model.save_pretrained(meta)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "▁The", "▁river", "▁flows", "▁to"])},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Metaspace()
    words.decoder = decoders.Metaspace()
    words.save(str(meta / "tokenizer.json"))
    (meta / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert _stream_with(monkeypatch, capsys, meta, "The river", [3, 4]) == "The river flows to"


def test_trainer_gradient_accumulation_matches_the_larger_batch(tmp_path):
    """transformers' Trainer scales the loss for gradient accumulation unless the model says it takes
    loss kwargs; forward's **kwargs made it think so, and two accumulated micro-batches of one gave
    twice the update of one batch of two."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    rows = [torch.randint(3, VOCAB, (16,)) for _ in range(2)]
    data = [{"input_ids": r, "labels": r.clone()} for r in rows]

    def update(batch, accumulate):
        torch.manual_seed(0)
        model = tiny_hf(aux_loss_scale=0.0).float().train()
        before = model.model.layers["0"].mixer.q_proj.weight.detach().clone()
        args = TrainingArguments(output_dir=str(tmp_path / f"{batch}x{accumulate}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=1.0, optim="sgd",
                                 lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True,
                                 max_grad_norm=0.0, seed=0, data_seed=0)
        Trainer(model=model, args=args, train_dataset=data).train()
        return model.model.layers["0"].mixer.q_proj.weight.detach() - before

    whole, accumulated = update(2, 1), update(1, 2)
    assert_close("accumulated update", accumulated, whole, 1e-4)
