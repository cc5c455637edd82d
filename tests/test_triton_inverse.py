"""`common.inverse_blocks` (the (I + A)^-1 of the delta rules' chunk prepare, from 16 x 16 blocks)
against a float64 inverse, under the Triton interpreter, at every chunk size the kernels take and
for near-singular products of correlated keys; and the chunk sizes the kernels refuse."""

import pytest
import torch

from tests.interpreter import run_snippet

WORKER = r"""
import json
import torch, triton, triton.language as tl
from momtitan.ops.triton.common import inverse_blocks

@triton.jit
def _load(a_ptr, r: tl.constexpr, q: tl.constexpr, C: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr):
    ii = tl.arange(0, BS)
    if r < NB:
        x = tl.load(a_ptr + (r * BS + ii[:, None]) * C + q * BS + ii[None, :])
    else:
        x = tl.zeros([BS, BS], dtype=tl.float32)
    return x

@triton.jit
def _store(o_ptr, x, r: tl.constexpr, q: tl.constexpr, C: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr):
    ii = tl.arange(0, BS)
    if r < NB:
        tl.store(o_ptr + (r * BS + ii[:, None]) * C + q * BS + ii[None, :], x)

@triton.jit
def invert(a_ptr, o_ptr, C: tl.constexpr, BS: tl.constexpr):
    NB: tl.constexpr = C // BS
    X = inverse_blocks(_load(a_ptr, 0, 0, C, BS, NB), _load(a_ptr, 1, 0, C, BS, NB), _load(a_ptr, 1, 1, C, BS, NB),
                       _load(a_ptr, 2, 0, C, BS, NB), _load(a_ptr, 2, 1, C, BS, NB), _load(a_ptr, 2, 2, C, BS, NB),
                       _load(a_ptr, 3, 0, C, BS, NB), _load(a_ptr, 3, 1, C, BS, NB), _load(a_ptr, 3, 2, C, BS, NB),
                       _load(a_ptr, 3, 3, C, BS, NB), NB, BS)
    _store(o_ptr, X[0], 0, 0, C, BS, NB)
    _store(o_ptr, X[1], 1, 0, C, BS, NB)
    _store(o_ptr, X[2], 1, 1, C, BS, NB)
    _store(o_ptr, X[3], 2, 0, C, BS, NB)
    _store(o_ptr, X[4], 2, 1, C, BS, NB)
    _store(o_ptr, X[5], 2, 2, C, BS, NB)
    _store(o_ptr, X[6], 3, 0, C, BS, NB)
    _store(o_ptr, X[7], 3, 1, C, BS, NB)
    _store(o_ptr, X[8], 3, 2, C, BS, NB)
    _store(o_ptr, X[9], 3, 3, C, BS, NB)

torch.manual_seed(0)
errors = {}
for C in (16, 32, 64):
    keys = torch.nn.functional.normalize(torch.randn(C, 8) + 2.0, dim=-1)  # highly correlated keys
    for name, A in (("random", 0.3 * torch.randn(C, C)), ("near ones", torch.full((C, C), 0.99)),
                    ("correlated keys", 0.95 * keys @ keys.T)):
        A = torch.tril(A, -1).float().contiguous()
        out = torch.full_like(A, float("nan"))
        out.triu_(1).nan_to_num_(0.0)  # the upper blocks are the caller's: zero here
        invert[(1,)](A, out, C=C, BS=16)
        ref = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + A.double())
        errors[f"C={C} {name}"] = ((out.double() - ref).norm() / ref.norm()).item()
print(json.dumps(errors))
"""


def test_inverse_blocks_match_float64():
    errors = run_snippet(WORKER, timeout=300)
    assert len(errors) == 9
    assert all(err < 1e-6 for err in errors.values()), errors


@pytest.mark.parametrize("chunk_size", [8, 48, 128])
def test_triton_recurrence_refuses_other_chunk_sizes(chunk_size):
    from momtitan.ops.triton import triton_linear_recurrence

    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match=f"chunk_size must be 16, 32 or 64 for the Triton kernels, got {chunk_size}"):
        triton_linear_recurrence(q, q, q, chunk_size=chunk_size)
