"""`ops/triton/l2norm.py`: the one-pass reciprocal row norms and L2-norm backward against their
PyTorch references in float64, under the Triton interpreter at awkward shapes (K not a power of two,
rows not a multiple of the row block, zero rows), and on the GPU in bf16."""

import pytest
import torch

from tests.interpreter import run_snippet

WORKER = r"""
import json
import torch
from momtitan.ops.triton.l2norm import l2norm_bwd, l2norm_bwd_reference, reciprocal_norms, reciprocal_norms_reference

torch.manual_seed(0)
errors = {}
for shape in ((3, 5, 80), (37, 2, 16), (1, 1, 256), (130, 1, 32)):
    x = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 10  # rows of different norms
    x[0, 0] = 0.0  # a zero row: r is 1 / eps there
    r = reciprocal_norms(x)
    ref_r = reciprocal_norms_reference(x.double())
    errors["norms " + str(shape)] = ((r.double() - ref_r) / ref_r).abs().max().item()  # per row
    dxn = torch.randn(*shape)
    got = l2norm_bwd(x, r, dxn)
    ref = l2norm_bwd_reference(x.double(), ref_r, dxn.double())
    errors["bwd " + str(shape)] = ((got.double() - ref).norm() / ref.norm()).item()
print(json.dumps(errors))
"""


def test_norms_and_backward_match_the_references_under_the_interpreter():
    errors = run_snippet(WORKER, timeout=300)
    assert len(errors) == 8
    assert all(err < 1e-6 for err in errors.values()), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("K", [64, 128, 256])
def test_norms_and_backward_bf16_on_cuda(K):
    from momtitan.ops.triton.l2norm import (
        l2norm_bwd, l2norm_bwd_reference, reciprocal_norms, reciprocal_norms_reference,
    )

    x = torch.randn(4097, 3, K, device="cuda", dtype=torch.bfloat16)
    x[0, 0] = 0.0
    r = reciprocal_norms(x)
    ref_r = reciprocal_norms_reference(x.double())
    assert r.dtype == torch.float32 and ((r.double() - ref_r) / ref_r).abs().max().item() < 1e-6
    dxn = torch.randn(4097, 3, K, device="cuda")
    got = l2norm_bwd(x, r, dxn)
    assert got.dtype == torch.bfloat16
    ref = l2norm_bwd_reference(x.double(), r.double(), dxn.double())
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2
