"""The model: packed documents, decoding with the recurrent cache, parameter counts, init."""

import pytest
import torch

from momtitan.cache import ModelCache
from momtitan.config import get_flavor
from momtitan.layers.mom import MoMLayer
from momtitan.model import MoMTransformer, get_nparams_and_flops
from tests.conftest import assert_close


def tiny_model(**changes):
    args = get_flavor("debug").replace(**changes)
    model = MoMTransformer(args).double()
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_packed_documents_equal_separate_runs(attn_layers):
    model = tiny_model(num_hidden_layers=3, attn_layers=attn_layers)
    docs = [torch.randint(0, 2048, (n,)) for n in (5, 1, 9, 4)]
    packed = torch.cat(docs)[None]
    doc_starts = torch.zeros_like(packed, dtype=torch.bool)
    doc_starts[0, torch.tensor([0, 5, 6, 15])] = True
    logits = model(packed, doc_starts=doc_starts).logits
    start = 0
    for doc in docs:
        alone = model(doc[None]).logits
        assert_close(f"document at {start}", logits[:, start : start + len(doc)], alone, 1e-10)
        start += len(doc)


@pytest.mark.parametrize("attn_layers,shared", [((), True), ((1,), True), ((), False)])
def test_prefill_then_steps_equal_full_forward(attn_layers, shared):
    model = tiny_model(num_hidden_layers=3, attn_layers=attn_layers, shared_mem=shared)
    B, T = 3, 21
    tokens = torch.randint(0, 2048, (B, T))
    doc_starts = torch.zeros(B, T, dtype=torch.bool)
    doc_starts[0, 6] = doc_starts[1, 2] = doc_starts[1, 11] = True  # documents inside the prompts
    full = model(tokens, doc_starts=doc_starts).logits
    cache = ModelCache.allocate(model.args, B, dtype=torch.float64, max_len=32)
    first = model(tokens[:, :8], doc_starts=doc_starts[:, :8], cache=cache).logits
    second = model(tokens[:, 8:13], doc_starts=doc_starts[:, 8:13], cache=cache).logits
    steps = torch.cat([model.decode_step(tokens[:, t : t + 1], cache) for t in range(13, T)], dim=1)
    assert_close("prefill", first, full[:, :8], 1e-10)
    assert_close("second prefill", second, full[:, 8:13], 1e-10)
    assert_close("decode steps", steps, full[:, 13:], 1e-10)
    assert int(cache.position) == T


def test_layer_decoding_with_a_memory_unused_for_many_tokens():
    args = get_flavor("debug").replace(num_memories=4, topk=2)
    layer = MoMLayer(args).double()
    layer.reset_parameters()
    with torch.no_grad():  # memory 3's logit is 50 * x[0]: unused while x[0] < 0, then favoured
        layer.router.weight[3] = 0
        layer.router.weight[3, 0] = 50.0
    T = 24
    x = torch.randn(2, T, args.hidden_size, dtype=torch.float64)
    x[:, :18, 0] = -x[:, :18, 0].abs() - 1
    x[:, 18:, 0] = x[:, 18:, 0].abs() + 1
    full, _, load_prefix = layer(x[:, :18])
    assert load_prefix[3] == 0
    reference, _, _ = layer(x)
    state = ModelCache.allocate(args, 2, dtype=torch.float64).layers[0]
    prefix, _, _ = layer(x[:, :4], state=state)
    steps = torch.cat([layer.step(x[:, t : t + 1], state) for t in range(4, T)], dim=1)
    assert_close("prefill", prefix, reference[:, :4], 1e-10)
    assert_close("steps", steps, reference[:, 4:], 1e-10)


def test_parameter_counts_match_the_spec():
    # MOM_SPEC.md §1.1: 340M cfg ≈512M total, ≈411M activated, ≈444M with embedding and head apart;
    # 1.3B cfg ≈1.55B / ≈1.35B / ≈1.42B.
    for flavor, total, activated, untied in (("340M", 512e6, 411e6, 444e6), ("1.3B", 1.55e9, 1.35e9, 1.42e9)):
        args = get_flavor(flavor)
        with torch.device("meta"):
            model = MoMTransformer(args)
        n = sum(p.numel() for p in model.parameters())
        per_memory = sum(p.numel() for p in model.layers["0"].mixer.memories.parameters()) // args.num_memories
        act = n - (args.num_memories - args.topk) * per_memory * args.num_hidden_layers
        assert abs(n - total) / total < 0.01, (flavor, n)
        assert abs(act - activated) / activated < 0.01, (flavor, act)
        assert abs(act + args.vocab_size * args.hidden_size - untied) / untied < 0.01, (flavor, act)


def test_init_weights_from_meta_device_and_flops():
    args = get_flavor("debug")
    with torch.device("meta"):
        model = MoMTransformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    A = model.layers["0"].mixer.A_log.exp()
    assert ((A > 0) & (A <= 16)).all()
    out = model(torch.randint(0, args.vocab_size, (2, 16)))
    assert out.logits.shape == (2, 16, args.vocab_size) and out.memory_load.shape == (2, args.num_memories)
    nparams, flops = get_nparams_and_flops(args, model, 16)
    assert nparams == sum(p.numel() for p in model.parameters()) and flops > 6 * (nparams - args.vocab_size * args.hidden_size) * 0.5


def test_training_loss_falls_on_a_repeating_sequence():
    model = tiny_model().float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(25):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_valid_mask_leaves_padding_out_of_aux_loss_and_load():
    """Right padding marked invalid: the aux loss and memory load are those of the real tokens alone
    (padding after them cannot change them either, the model being causal)."""
    model = tiny_model(num_hidden_layers=3)
    real = torch.randint(0, 2048, (1, 13))
    padded = torch.cat([real, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    valid = torch.zeros(1, 19, dtype=torch.bool)
    valid[:, :13] = True
    alone = model(real)
    masked = model(padded, valid=valid)
    assert_close("aux", masked.aux_loss, alone.aux_loss, 1e-12)
    assert_close("load", masked.memory_load, alone.memory_load, 1e-12)
    assert_close("logits", masked.logits[:, :13], alone.logits, 1e-12)
    unmasked = model(padded)
    assert (unmasked.memory_load - alone.memory_load).abs().max() > 1e-6  # the mask is what made them equal


@pytest.mark.parametrize("attn_layers", [(), (1,)])
def test_logits_to_keep_equals_the_last_positions(attn_layers):
    model = tiny_model(num_hidden_layers=3, attn_layers=attn_layers)
    tokens = torch.randint(0, 2048, (2, 17))
    full = model(tokens).logits
    kept = model(tokens, logits_to_keep=3).logits
    assert kept.shape == (2, 3, full.shape[-1])
    assert_close("kept logits", kept, full[:, -3:], 1e-12)


def test_logits_at_equals_those_positions_and_checks_its_argument():
    model = tiny_model(num_hidden_layers=2)
    tokens = torch.randint(0, 2048, (2, 17))
    full = model(tokens).logits
    at = torch.tensor([[0, 16, 5], [9, 9, 3]])
    picked = model(tokens, logits_at=at).logits
    assert picked.shape == (2, 3, full.shape[-1])
    assert_close("logits at", picked, full.gather(1, at[..., None].expand(-1, -1, full.shape[-1])), 1e-12)
    with pytest.raises(ValueError, match="logits_at must be an int64 tensor of shape \\[2, P\\], got torch.int32"):
        model(tokens, logits_at=at.int())
    with pytest.raises(ValueError, match="logits_at must be .* got torch.int64 \\(3,\\)"):
        model(tokens, logits_at=at[0])
    with pytest.raises(ValueError, match="not both"):
        model(tokens, logits_to_keep=2, logits_at=at)


def test_cache_of_another_batch_size_is_refused():
    model = tiny_model()
    cache = ModelCache.allocate(model.args, 3, dtype=torch.float64)
    tokens = torch.randint(0, 2048, (2, 4))
    with pytest.raises(ValueError, match=r"cache holds batch size 3, got tokens of batch size 2"):
        model(tokens, cache=cache)
    with pytest.raises(ValueError, match=r"cache holds batch size 3, got tokens of batch size 2"):
        model.decode_step(tokens[:, :1], cache)


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_model()
    cache = ModelCache.allocate(model.args, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=2048\), got ids in \[3, 2048\]"):
        model(torch.tensor([[3, 2048]]))
    with pytest.raises(ValueError, match=r"got ids in \[-1, 5\]"):
        model(torch.tensor([[5, -1]]))
    with pytest.raises(ValueError, match=r"got ids in \[4096, 4096\]"):
        model.decode_step(torch.tensor([[4096]]), cache)


def test_forward_rejects_bad_masks_and_logits_to_keep():
    model = tiny_model()
    tokens = torch.randint(0, 2048, (2, 5))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(2, 5\), got torch.int64 \(2, 5\)"):
        model(tokens, valid=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(2, 5\), got torch.bool \(2, 4\)"):
        model(tokens, valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logits_to_keep must be an integer >= 0 \(0: every position\), got -1"):
        model(tokens, logits_to_keep=-1)
    with pytest.raises(ValueError, match=r"logits_to_keep must be .* got 1.5"):
        model(tokens, logits_to_keep=1.5)


def test_replace_derives_the_mlp_width_again():
    from momtitan.config import MoMModelArgs

    args = MoMModelArgs(hidden_ratio=3)
    assert args.replace(hidden_size=2048).intermediate_size == MoMModelArgs(hidden_size=2048, hidden_ratio=3).intermediate_size
    assert args.replace(hidden_ratio=4).intermediate_size == MoMModelArgs(hidden_ratio=4).intermediate_size
    assert args.replace(hidden_size=2048, intermediate_size=512).intermediate_size == 512  # set explicitly: kept
    assert args.replace(num_heads=8).intermediate_size == args.intermediate_size
