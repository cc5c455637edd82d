"""`ops/triton/l2norm.py`: the one-pass reciprocal row norms against their PyTorch reference in float64,
under the Triton interpreter at awkward shapes (K not a power of two, rows not a multiple of the row
block, zero rows), and on the GPU in bf16. The norm's backward is part of the gradient kernel: the
recurrence tests check it through every q / k gradient with `qk_l2norm`."""

import pytest
import torch

from tests.interpreter import run_snippet

WORKER = r"""
import json
import torch
from momtitan.ops.triton.l2norm import reciprocal_norms, reciprocal_norms_reference

torch.manual_seed(0)
errors = {}
for shape in ((3, 5, 80), (37, 2, 16), (1, 1, 256), (130, 1, 32)):
    x = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 10  # rows of different norms
    x[0, 0] = 0.0  # a zero row: r is 1 / eps there
    r = reciprocal_norms(x)
    ref_r = reciprocal_norms_reference(x.double())
    errors["norms " + str(shape)] = ((r.double() - ref_r) / ref_r).abs().max().item()  # per row
print(json.dumps(errors))
"""


def test_norms_match_the_reference_under_the_interpreter():
    errors = run_snippet(WORKER, timeout=300)
    assert len(errors) == 4
    assert all(err < 1e-6 for err in errors.values()), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("K", [64, 128, 256])
def test_norms_bf16_on_cuda(K):
    from momtitan.ops.triton.l2norm import reciprocal_norms, reciprocal_norms_reference

    x = torch.randn(4097, 3, K, device="cuda", dtype=torch.bfloat16)
    x[0, 0] = 0.0
    r = reciprocal_norms(x)
    ref_r = reciprocal_norms_reference(x.double())
    assert r.dtype == torch.float32 and ((r.double() - ref_r) / ref_r).abs().max().item() < 1e-6
