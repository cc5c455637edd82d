"""Bad input gets a ValueError that names the argument and the value it got."""

import pytest
import torch

from momtitan.config import MoMModelArgs, get_flavor
from momtitan.ops import linear_recurrence
from momtitan.ops.conv import short_conv


def qkv(B=1, T=6, H=2, K=4, V=4, dtype=torch.float32):
    return torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, V, dtype=dtype)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), r"q must be \[B, T, H, K\], got shape \(6, 2, 4\)"),
    (lambda q, k, v: (q, k[..., :3], v), r"k must have the shape of q \(1, 6, 2, 4\), got \(1, 6, 2, 3\)"),
    (lambda q, k, v: (q, k, v[:, :5]), r"v must be .*got \(1, 5, 2, 4\)"),
    (lambda q, k, v: (q, k, v.double()), r"q, k and v must share a dtype, got .*torch.float64"),
    (lambda q, k, v: (q.long(), k, v), r"q must be a floating-point tensor, got dtype torch.int64"),
])
def test_linear_recurrence_rejects_bad_shapes_and_dtypes(bad, match):
    with pytest.raises(ValueError, match=match):
        linear_recurrence(*bad(*qkv()))


def test_linear_recurrence_rejects_bad_gates_states_and_cu_seqlens():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\] = \(1, 6, 2\), got \(1, 6, 3\)"):
        linear_recurrence(q, k, v, g=torch.zeros(1, 6, 3))
    with pytest.raises(ValueError, match=r"beta must be a floating-point tensor, got dtype torch.int64"):
        linear_recurrence(q, k, v, beta=torch.zeros(1, 6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\] = \(1, 2, 4, 4\), got \(2, 2, 4, 4\)"):
        linear_recurrence(q, k, v, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]=5"):
        linear_recurrence(q, k, v, cu_seqlens=torch.tensor([0, 2, 5]))  # does not cover T = 6
    with pytest.raises(ValueError, match=r"non-decreasing, got \[0, 4, 2, 6\]"):
        linear_recurrence(q, k, v, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match=r"cu_seqlens must be int32 or int64, got torch.float32"):
        linear_recurrence(q, k, v, cu_seqlens=torch.tensor([0.0, 6.0]))
    q2, k2, v2 = qkv(B=2)
    with pytest.raises(ValueError, match=r"batch size must be 1 .*got q of shape \(2, 6, 2, 4\)"):
        linear_recurrence(q2, k2, v2, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"reset must be a bool tensor of shape \(1, 6\), got torch.int64"):
        linear_recurrence(q, k, v, reset=torch.zeros(1, 6, dtype=torch.long))


def test_short_conv_rejects_bad_input():
    with pytest.raises(ValueError, match=r"weight must be \[D=3, W\], got torch.Size\(\[4, 4\]\)"):
        short_conv(torch.randn(1, 5, 3), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]=4"):
        short_conv(torch.randn(1, 5, 3), torch.randn(3, 4), cu_seqlens=torch.tensor([0, 4]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"topk must be <= num_memories \(4\), got topk=5"):
        MoMModelArgs(num_memories=4, topk=5)
    with pytest.raises(ValueError, match=r"memory_rule must be one of .*got 'mamba'"):
        MoMModelArgs(memory_rule="mamba")
    with pytest.raises(ValueError, match=r"unknown flavor '7B'"):
        get_flavor("7B")
    with pytest.raises(ValueError, match=r"attn_layers must hold layer indices in \[0, 24\), got \(30,\)"):
        MoMModelArgs(attn_layers=(30,))
    with pytest.raises(ValueError, match=r"conv_size must be an integer >= 2, got 1"):
        MoMModelArgs(conv_size=1)
    with pytest.raises(ValueError, match=r"num_memories must be a positive integer, got 0"):
        MoMModelArgs(num_memories=0)


def test_dtype_names_are_checked_with_the_argument_name():
    from momtitan.checks import as_dtype

    assert as_dtype("bfloat16") is torch.bfloat16 and as_dtype(torch.float16) is torch.float16 and as_dtype(None) is None
    with pytest.raises(ValueError, match=r"softmax_dtype must be one of \['bfloat16', .*\], got 'fp8'"):
        as_dtype("fp8", "softmax_dtype")


def test_config_rejects_bad_attention_kv_heads_and_hidden_ratio():
    with pytest.raises(ValueError, match=r"attn_num_kv_heads must be a positive integer, got -2"):
        MoMModelArgs(attn_num_kv_heads=-2)
    with pytest.raises(ValueError, match=r"attn_num_kv_heads must be a positive integer, got 0"):
        MoMModelArgs(attn_num_kv_heads=0)
    with pytest.raises(ValueError, match=r"hidden_ratio must be a positive number, got -1"):
        MoMModelArgs(hidden_ratio=-1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attn_layers="13"), TypeError, r"attn_layers must be a sequence of layer indices, got '13'"),
    (dict(attn_layers=5), TypeError, r"attn_layers must be a sequence of layer indices, got 5"),
    (dict(attn_layers=(True,)), TypeError, r"attn_layers must hold integer layer indices, got \(True,\)"),
    (dict(attn_layers=(1.7,)), TypeError, r"attn_layers must hold integer layer indices, got \(1.7,\)"),
    (dict(aux_loss_scale=float("nan")), ValueError, r"aux_loss_scale must be >= 0, got nan"),
    (dict(norm_eps=float("nan")), ValueError, r"norm_eps must be positive and finite, got nan"),
    (dict(rope_theta=0.0), ValueError, r"rope_theta must be positive and finite, got 0.0"),
    (dict(rope_theta=-1e4), ValueError, r"rope_theta must be positive and finite, got -10000.0"),
    # half-split RoPE rotates pairs: an odd attention head size used to crash in the forward
    (dict(hidden_size=60, attn_num_heads=4, attn_layers=(1,)), ValueError,
     r"hidden_size / attn_num_heads must be even .*got 60 / 4"),
])
def test_config_rejects_values_that_used_to_pass(kwargs, error, match):
    with pytest.raises(error, match=match):
        get_flavor("debug").replace(**kwargs)
    assert get_flavor("debug").replace(attn_layers=[1]).attn_layers == (1,)  # a list from JSON / the CLI


def test_route_checks_topk():
    from momtitan.routing import route

    for topk in (0, 5, True):
        with pytest.raises(ValueError, match=rf"topk must be an integer in \[1, 4\] \(the memories\), got {topk!r}"):
            route(torch.randn(2, 3, 4), topk)


def test_model_rejects_empty_input_and_a_full_attention_cache_before_writing_to_it():
    from momtitan.cache import ModelCache
    from momtitan.model import MoMTransformer

    args = get_flavor("debug").replace(attn_layers=(1,))
    torch.manual_seed(0)
    model = MoMTransformer(args)
    model.init_weights()
    with pytest.raises(ValueError, match=r"tokens must hold at least one position, got shape \(2, 0\)"):
        model(torch.zeros(2, 0, dtype=torch.long))
    cache = ModelCache.allocate(args, 1, max_len=8)
    model(torch.randint(0, args.vocab_size, (1, 6)), cache=cache)
    states = [s.recurrent.clone() for s in cache.layers if hasattr(s, "recurrent")]
    with pytest.raises(ValueError, match=r"hold max_len=8 positions, 6 filled: no room for 4 more tokens"):
        model(torch.randint(0, args.vocab_size, (1, 4)), cache=cache)
    # the MoM layer before the attention layer was not advanced by the refused call
    assert all(torch.equal(a, s.recurrent) for a, s in zip(states, [s for s in cache.layers if hasattr(s, "recurrent")]))
    assert int(cache.position) == 6
    model(torch.randint(0, args.vocab_size, (1, 2)), cache=cache)
    with pytest.raises(ValueError, match=r"8 filled: no room for 1 more tokens"):
        model.decode_step(torch.randint(0, args.vocab_size, (1, 1)), cache)


def test_layer_step_rejects_a_state_of_another_batch_size():
    from momtitan.cache import ModelCache
    from momtitan.layers.mom import MoMLayer

    args = get_flavor("debug")
    layer = MoMLayer(args)
    state = ModelCache.allocate(args, 3).layers[0]
    with pytest.raises(ValueError, match=r"state holds 15 streams, 10 expected for a batch of 2 \(4 memories \+ shared\)"):
        layer.step(torch.randn(2, 1, args.hidden_size), state)
    with pytest.raises(ValueError, match=rf"step takes x of shape \[B, 1, {args.hidden_size}\], got \(3, 2, {args.hidden_size}\)"):
        layer.step(torch.randn(3, 2, args.hidden_size), state)
