"""The MoM layer against a naive per-token, per-memory loop written here from MOM_SPEC.md §1.2."""

import pytest
import torch
import torch.nn.functional as F

from momtitan.config import get_flavor
from momtitan.layers.mom import MoMLayer
from tests.conftest import assert_close


def naive_mom(layer: MoMLayer, x: torch.Tensor, doc_starts=None) -> torch.Tensor:
    """Token by token: route, then for each chosen memory (and the shared one) push q|k|v into that
    memory's conv window, step its recurrent state, read it out; mix, gate, project."""
    B, T, D = x.shape
    E, k_top, H, K, V = layer.num_memories, layer.topk, layer.num_heads, layer.head_k, layer.head_v
    W = layer.conv_size
    C = layer.conv_weight.shape[0]
    out = torch.zeros(B, T, layer.value_dim, dtype=x.dtype)
    for b in range(B):
        S = [torch.zeros(H, K, V, dtype=x.dtype) for _ in range(E + 1)]  # index E: shared memory
        window = [torch.zeros(C, W - 1, dtype=x.dtype) for _ in range(E + 1)]
        for t in range(T):
            if doc_starts is not None and doc_starts[b, t]:
                S = [torch.zeros_like(s) for s in S]
                window = [torch.zeros_like(w) for w in window]
            xt = x[b, t]
            probs = torch.softmax(layer.router.weight @ xt, dim=-1)
            top = torch.topk(probs, k_top)
            weights = top.values / top.values.sum()
            chosen = [(int(m), weights[j]) for j, m in enumerate(top.indices)]
            if layer.shared_mem:
                chosen.append((E, 1.0))
            for m, w in chosen:
                if m < E:
                    mem = layer.memories
                    kw, vw = mem.k_proj[m], mem.v_proj[m]
                    bw = mem.b_proj[m] if mem.b_proj is not None else None
                    aw = mem.a_proj[m] if mem.a_proj is not None else None
                else:
                    kw, vw = layer.shared_k.weight, layer.shared_v.weight
                    bw = layer.shared_b.weight if layer.shared_b is not None else None
                    aw = layer.shared_a.weight if layer.shared_a is not None else None
                raw = torch.cat([layer.q_proj.weight @ xt, kw @ xt, vw @ xt])
                full = torch.cat([window[m], raw[:, None]], dim=1)
                window[m] = full[:, 1:]
                q, kk, v = F.silu((full * layer.conv_weight).sum(-1)).split([H * K, H * K, H * V])
                q = F.normalize(q.view(H, K), dim=-1)
                kk = F.normalize(kk.view(H, K), dim=-1)
                v = v.view(H, V)
                if aw is not None:
                    g = -layer.A_log.exp() * F.softplus(aw @ xt + layer.dt_bias)
                    S[m] = S[m] * g.exp()[:, None, None]
                if bw is not None:
                    beta = torch.sigmoid(bw @ xt)
                    u = beta[:, None] * (v - torch.einsum("hkv,hk->hv", S[m], kk))
                else:
                    u = v
                S[m] = S[m] + torch.einsum("hk,hv->hkv", kk, u)
                o = K**-0.5 * torch.einsum("hkv,hk->hv", S[m], q)
                out[b, t] += w * o.reshape(-1)
    gate = layer.g_proj(x).view(B, T, H, V)
    o = layer.o_norm(out.view(B, T, H, V), gate)
    return layer.o_proj(o.reshape(B, T, -1))


@pytest.mark.parametrize("rule", ["gated_delta", "delta", "gated", "linear"])
@pytest.mark.parametrize("shared", [True, False])
def test_layer_equals_naive_loop(rule, shared):
    args = get_flavor("debug").replace(memory_rule=rule, shared_mem=shared, num_memories=3, topk=2)
    layer = MoMLayer(args).double()
    layer.reset_parameters()
    x = torch.randn(2, 11, args.hidden_size, dtype=torch.float64)
    doc_starts = torch.zeros(2, 11, dtype=torch.bool)
    doc_starts[1, 4] = True
    out, aux, load = layer(x, doc_starts)
    assert_close("layer output", out, naive_mom(layer, x, doc_starts), 1e-10)
    assert abs(load.sum().item() - 1) < 1e-12


def test_unpicked_memory_gets_no_gradient_and_layer_backward_runs():
    args = get_flavor("debug").replace(num_memories=4, topk=1)
    layer = MoMLayer(args).double()
    layer.reset_parameters()
    with torch.no_grad():  # memory 3's logit is -1e3 * x[0], and x[0] > 0: nobody picks it
        layer.router.weight[3] = 0
        layer.router.weight[3, 0] = -1e3
    x = torch.randn(1, 9, args.hidden_size, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1
    out, aux, load = layer(x)
    assert load[3] == 0
    out.sum().backward()
    assert torch.count_nonzero(layer.memories.k_proj.grad[3]) == 0
    assert torch.count_nonzero(layer.memories.k_proj.grad[:3]) > 0


def test_output_norm_reads_a_higher_precision_combined_output_uncast():
    """fp32 memory outputs with a bf16 gate (as under autocast): the gated norm computes in fp32
    anyway, so the fp32 values must reach it as they are, not rounded to bf16 first."""
    args = get_flavor("debug")
    layer = MoMLayer(args).bfloat16()
    layer.reset_parameters()
    x = torch.randn(2, 5, args.hidden_size, dtype=torch.bfloat16)
    o = torch.randn(2, 5, layer.value_dim)
    gate = layer.g_proj(x).view(2, 5, layer.num_heads, layer.head_v)
    expected = layer.o_proj(layer.o_norm(o.view(2, 5, layer.num_heads, layer.head_v), gate).reshape(2, 5, -1))
    assert torch.equal(layer._output(o, x), expected)


def test_decode_step_refuses_expert_parallelism():
    """Under EP a rank holds E/ep memories while the routing names all E: step() must refuse, as the
    forward with a cache does, not gather out of range."""
    from momtitan.cache import ModelCache

    args = get_flavor("debug")
    layer = MoMLayer(args)
    state = ModelCache.allocate(args, 2).layers[0]
    layer.expert_parallel = object()  # any EP handle: the check comes before it is used
    with pytest.raises(ValueError, match=r"got step\(\) under EP"):
        layer.step(torch.randn(2, 1, args.hidden_size), state)
