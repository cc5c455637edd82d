"""A MoM block under torch.compile(fullgraph=True) on CPU: no graph break, equal to eager, fwd and bwd."""

import pytest
import torch
import torch._dynamo

from momtitan.config import get_flavor
from momtitan.model import MoMTransformer
from tests.conftest import assert_close


@pytest.mark.parametrize("backend", ["inductor"])
def test_mom_block_compiles_fullgraph_and_matches_eager(backend):
    args = get_flavor("debug")
    model = MoMTransformer(args)
    model.init_weights()
    block = model.layers["0"]
    x = torch.randn(2, 16, args.hidden_size, requires_grad=True)
    doc_starts = torch.zeros(2, 16, dtype=torch.bool)
    doc_starts[0, 5] = True
    dy = torch.randn(2, 16, args.hidden_size)

    eager = block(x, doc_starts)
    eager_grads = torch.autograd.grad((eager[0] * dy).sum() + eager[1], [x, *block.parameters()])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_block = torch.compile(block, fullgraph=True, backend=backend)  # raises on any graph break
    out = compiled_block(x, doc_starts)
    grads = torch.autograd.grad((out[0] * dy).sum() + out[1], [x, *block.parameters()])
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])

    assert_close("block output", out[0], eager[0], 1e-5)
    assert_close("aux loss", out[1], eager[1], 1e-6)
    for (name, _), a, b in zip([("x", None), *block.named_parameters()], grads, eager_grads, strict=True):
        assert b.abs().sum() > 0, f"d{name} is zero in eager: the inputs do not reach it"
        assert_close(f"d{name}", a, b, 1e-4)
