"""The expert-parallel exchange ops on a one-rank gloo group: their results, their registrations
(`torch.library.opcheck`: schema, fake, autograd), and the host sizes. Two ranks: test_expert_parallel."""

import pytest
import torch
import torch.distributed as dist

from momtitan.parallel.exchange_ops import SplitSizes


@pytest.fixture
def group_name(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()


def test_counts_exchange_and_its_host_totals(group_name):
    send = torch.tensor([[3, 0, 2, 5]])
    recv, host = torch.ops.momtitan.ep_exchange_counts(send, group_name)
    assert torch.equal(recv, send) and host.device.type == "cpu"
    assert SplitSizes(host).lists() == ([10], [10])
    torch.library.opcheck(torch.ops.momtitan.ep_exchange_counts.default, (send, group_name))


def test_row_exchange_and_its_gradient(group_name):
    rows = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.momtitan.ep_all_to_all_rows(rows, [7], [7], group_name)
    assert torch.equal(out, rows)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(rows.grad, grad)
    torch.library.opcheck(torch.ops.momtitan.ep_all_to_all_rows.default, (rows, [7], [7], group_name))
    empty = torch.zeros(0, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.momtitan.ep_all_to_all_rows.default, (empty, [0], [0], group_name))
