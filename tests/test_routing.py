"""Router, dispatch plan and combine against a naive per-token loop."""

import torch

from momtitan.routing import Routing, combine, load_balance_loss, plan_dispatch, route, stream_resets
from tests.conftest import assert_close


def test_route_is_renormalised_fp32_topk():
    logits = torch.randn(2, 5, 6, dtype=torch.bfloat16)
    r = route(logits, 3)
    assert r.probs.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert torch.allclose(r.weights.sum(-1), torch.ones(2, 5))
    expected = torch.softmax(logits.float(), -1).topk(3, -1)
    assert torch.equal(r.indices, expected.indices)


def test_plan_matches_naive_loop_and_keeps_time_order():
    B, T, k, E = 3, 17, 2, 5
    # distinct memories per token, and memory 4 picked by nobody
    indices = torch.stack([torch.randperm(E - 1)[:k] for _ in range(B * T)]).view(B, T, k)
    for shared in (False, True):
        plan = plan_dispatch(indices, E, shared)
        assert plan.token_of_row.numel() == B * T * k  # nothing dropped, no padding
        # naive: walk memories, then rows, then time
        expected_rows, cu = [], [0]
        for m in range(E):
            for b in range(B):
                rows = [b * T + t for t in range(T) if m in indices[b, t].tolist()]
                expected_rows += rows
                cu.append(cu[-1] + len(rows))
        if shared:
            cu += [cu[-1] + T * (b + 1) for b in range(B)]
        assert plan.token_of_row.tolist() == expected_rows
        assert plan.cu_seqlens.tolist() == cu
        assert plan.counts[4].sum() == 0 and plan.memory_offsets.tolist() == [cu[(m + 1) * B] for m in range(E)]
        slots = torch.arange(B * T * k)
        assert torch.equal(plan.token_of_row[plan.row_of_slot], slots // k)


def test_counts_come_from_indices_even_when_weights_underflow():
    logits = torch.tensor([[[30.0, 0.0, -30.0, -40.0]]]).expand(2, 4, 4).contiguous()
    r = route(logits, 2)
    assert (r.weights.half()[..., 1] == 0).all()  # a weight that fp16 rounds to zero
    plan = plan_dispatch(r.indices, 4, shared=False)
    assert plan.counts[:, 0].tolist() == [4, 4, 0, 0] and plan.counts.sum() == 2 * 4 * 2


def test_combine_matches_naive_loop():
    B, T, k, E, F = 2, 6, 2, 3, 4
    r = route(torch.randn(B, T, E), k)
    plan = plan_dispatch(r.indices, E, shared=True)
    per_memory = torch.randn(E, B, T, F, dtype=torch.float64)  # what memory m returns for token (b, t)
    routed = torch.zeros(B * T * k, F, dtype=torch.float64)
    for row, tok in enumerate(plan.token_of_row.tolist()):
        b, t = divmod(tok, T)
        m = int(torch.searchsorted(plan.memory_offsets.long(), torch.tensor(row), right=True))
        routed[row] = per_memory[m, b, t]
    shared = torch.randn(B * T, F, dtype=torch.float64)
    out = combine(routed, shared, plan, r.weights)
    expected = torch.zeros(B, T, F, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for j in range(k):
                expected[b, t] += r.weights[b, t, j] * per_memory[r.indices[b, t, j], b, t]
            expected[b, t] += shared[b * T + t]
    assert_close("combine", out, expected, 1e-12)


def test_stream_resets_mark_first_row_of_each_document_per_memory():
    indices = torch.tensor([[[0, 1], [1, 2], [0, 2], [0, 1]]])  # B=1, T=4
    doc_starts = torch.tensor([[False, False, True, False]])
    plan = plan_dispatch(indices, 3, shared=True)
    reset = stream_resets(doc_starts, plan, shared=True)
    # memory 0: tokens 0,2,3 -> reset at token 2; memory 1: 0,1,3 -> reset at 3; memory 2: 1,2 -> reset at 2
    assert reset.tolist() == [False, True, False, False, False, True, False, True] + [False, False, True, False]


def test_load_balance_loss_is_topk_at_balance():
    E, k = 4, 2
    indices = torch.tensor([[[0, 1], [2, 3]]])
    probs = torch.full((1, 2, E), 1 / E)
    aux, load = load_balance_loss(Routing(probs, torch.full((1, 2, k), 0.5), indices), E)
    assert abs(aux.item() - k) < 1e-6 and torch.allclose(load, torch.full((E,), 1 / E))


def test_load_balance_loss_ignores_padding():
    E, k = 4, 2
    r = route(torch.randn(2, 6, E), k)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :3] = False
    aux, load = load_balance_loss(r, E, valid)
    only_valid = Routing(r.probs[valid][None], r.weights[valid][None], r.indices[valid][None])
    aux_ref, load_ref = load_balance_loss(only_valid, E)
    assert torch.allclose(aux, aux_ref) and torch.allclose(load, load_ref)
