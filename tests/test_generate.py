"""momtitan.generate: sampling, eager and compiled decoding against the full forward, left padding, EOS."""

import pytest
import torch
import torch._dynamo

from momtitan.config import get_flavor
from momtitan.cache import ModelCache
from momtitan.generate import Generator, padding_doc_starts, prefill, sample_tokens, uses_cuda_graphs
from momtitan.model import MoMTransformer

VOCAB = 2048


def tiny_model(dtype=torch.float64, **changes) -> MoMTransformer:
    model = MoMTransformer(get_flavor("debug").replace(**changes)).to(dtype)
    model.init_weights()
    return model.eval()


@torch.no_grad()
def full_forward_greedy(model, prompt, n):
    tokens = prompt
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompt.shape[1]:]


def test_sample_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).repeat(40000, 1)
    uniform = torch.rand(40000, 4)
    assert torch.equal(sample_tokens(logits, 0.0), torch.full((40000,), 2))
    assert torch.equal(sample_tokens(logits, 1.0, top_k=1, uniform=uniform), torch.full((40000,), 2))
    assert torch.equal(sample_tokens(logits, 1.0, top_p=0.01, uniform=uniform), torch.full((40000,), 2))
    for temperature in (1.0, 0.5):
        counts = torch.bincount(sample_tokens(logits, temperature, uniform=uniform), minlength=4) / 40000
        expected = torch.softmax(logits[0] / temperature, -1)
        assert (counts - expected).abs().max() < 0.01, (counts, expected)
    top2 = torch.bincount(sample_tokens(logits, 1.0, top_k=2, uniform=uniform), minlength=4) / 40000
    assert top2[0] == 0 and top2[3] == 0 and abs(top2[2] - torch.sigmoid(torch.tensor(1.0))) < 0.01
    # nucleus 0.7: {2} has 0.54 < 0.7, so {2, 1} is kept
    nucleus = torch.bincount(sample_tokens(logits, 1.0, top_p=0.7, uniform=uniform), minlength=4) / 40000
    assert nucleus[0] == 0 and nucleus[3] == 0 and nucleus[1] > 0.2
    with pytest.raises(ValueError, match="noise"):
        sample_tokens(logits, 1.0)


def test_padding_doc_starts():
    assert padding_doc_starts(torch.ones(2, 5)) is None
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    starts = padding_doc_starts(mask)
    assert starts.tolist() == [[False, False, True, False], [True, False, False, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="right padding"):
        padding_doc_starts(mask, allow_right_padding=False)
    with pytest.raises(ValueError, match="one run"):
        padding_doc_starts(torch.tensor([[1, 0, 1]]))


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_eager_decoding_equals_full_forward_with_left_padding(attn_layers):
    model = tiny_model(attn_layers=attn_layers)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (6, 2, 4)]
    T = 6
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, 1
    out = Generator(model, compile=False).generate(batch, 7, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i], full_forward_greedy(model, p[None], 7)[0]), f"row {i}"


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_chunked_prefill_equals_one_forward(attn_layers):
    """Chunks of 4 (T = 11: a partial last chunk; left padding crossing a chunk edge) leave the same
    cache and last logits as one forward, and generation continues identically."""
    model = tiny_model(attn_layers=attn_layers)
    batch = torch.randint(3, VOCAB, (2, 11))
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    doc_starts = padding_doc_starts(mask)
    caches = [ModelCache.allocate(model.args, 2, dtype=torch.float64, max_len=16) for _ in range(2)]
    whole = prefill(model, batch, caches[0], doc_starts=doc_starts)
    chunked = prefill(model, batch, caches[1], doc_starts=doc_starts, chunk_size=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)
    assert caches[0].position == caches[1].position == 11
    step = [model.decode_step(whole.argmax(-1, keepdim=True), c) for c in caches]
    torch.testing.assert_close(step[1], step[0], rtol=1e-10, atol=1e-10)
    gen = Generator(model, compile=False)
    assert torch.equal(gen.generate(batch, 5, attention_mask=mask, prefill_chunk_size=3),
                       gen.generate(batch, 5, attention_mask=mask))
    with pytest.raises(ValueError, match="chunk_size"):
        prefill(model, batch, caches[0], chunk_size=0)


def test_eos_stops_rows_and_generation():
    model = tiny_model()
    prompt = torch.randint(3, VOCAB, (2, 5))
    gen = Generator(model, compile=False)
    free = gen.generate(prompt, 8)
    eos = int(free[0, 2])
    out = gen.generate(prompt, 8, eos_token_id=eos, pad_token_id=0, sync_every=1)
    row0 = out[0].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, : row0.index(eos) + 1].tolist()
    assert all(t == 0 for t in row0[row0.index(eos) + 1:])
    if eos not in free[1].tolist():
        assert out.shape[1] == 8 and torch.equal(out[1], free[1])
    # both rows end -> generation stops early
    both = gen.generate(prompt[:1], 8, eos_token_id=eos, sync_every=1)
    assert both.shape[1] == free[0].tolist().index(eos) + 1


def test_compiled_decoding_equals_eager_and_full_forward():
    """torch.compile (inductor, fullgraph) of the decode step + sampler on CPU, greedy and sampled."""
    torch._dynamo.reset()
    model = tiny_model(dtype=torch.float32, num_hidden_layers=1)
    prompt = torch.randint(3, VOCAB, (2, 5))
    eager = Generator(model, compile=False)
    compiled = Generator(model, compile=True)
    greedy = compiled.generate(prompt, 6)
    assert torch.equal(greedy, eager.generate(prompt, 6))
    assert torch.equal(greedy, full_forward_greedy(model, prompt, 6))
    kwargs = dict(temperature=0.8, top_k=100, top_p=0.9, seed=7)
    sampled = compiled.generate(prompt, 6, **kwargs)
    assert torch.equal(sampled, eager.generate(prompt, 6, **kwargs))
    assert not torch.equal(sampled, compiled.generate(prompt, 6, **{**kwargs, "seed": 8}))


@pytest.mark.gpu
@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_cuda_graph_decoding_equals_eager(attn_layers):
    torch._dynamo.reset()
    model = tiny_model(dtype=torch.float32, attn_layers=attn_layers).cuda()
    prompt = torch.randint(3, VOCAB, (4, 9), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    compiled = Generator(model)  # CUDA: inductor + reduce-overhead (CUDA graphs)
    assert compiled.cuda_graphs
    eager = Generator(model, compile=False)
    out = compiled.generate(prompt, 24, attention_mask=mask)
    assert torch.equal(out, eager.generate(prompt, 24, attention_mask=mask))
    assert torch.equal(out, compiled.generate(prompt, 24, attention_mask=mask))  # graph replays on a new cache
    kwargs = dict(temperature=0.7, top_k=50, seed=3)
    assert torch.equal(compiled.generate(prompt, 16, **kwargs), eager.generate(prompt, 16, **kwargs))


def test_cuda_graph_modes_follow_inductor():
    assert uses_cuda_graphs("reduce-overhead") and uses_cuda_graphs("max-autotune")
    assert not uses_cuda_graphs(None) and not uses_cuda_graphs("default")
    assert not uses_cuda_graphs("max-autotune-no-cudagraphs")


def test_generate_rejects_bad_sync_every_and_top_k():
    gen = Generator(tiny_model(), compile=False)
    prompt = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ValueError, match=r"sync_every must be a positive integer, got 0"):
        gen.generate(prompt, 4, eos_token_id=2, sync_every=0)
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 0 \(0: no limit\), got 2.5"):
        gen.generate(prompt, 4, temperature=1.0, top_k=2.5)
    with pytest.raises(ValueError, match=r"top_k must be .* got -1"):
        gen.generate(prompt, 4, top_k=-1)
