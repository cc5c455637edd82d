"""`ops/triton/chunk_map.py`: the one-program chunk map against its PyTorch reference, under the Triton
interpreter (uniform batches, int32 and int64 `cu_seqlens`, empty segments, all segments empty, T = 1,
more segments and more chunks than one block of the program), and on the GPU at MoM's many segments."""

import pytest
import torch

from tests.interpreter import run_snippet

WORKER = r"""
import json
import torch
from momtitan.ops.segments import uniform_cu_seqlens
from momtitan.ops.triton.chunk_map import BLOCK, chunk_map, chunk_map_reference

g = torch.Generator().manual_seed(0)
cpu = torch.device("cpu")
cases = {"uniform 3x100 C64": (None, 3, 100, 64), "uniform 1x1 C16": (None, 1, 1, 16),
         "uniform 5x64 C32": (None, 5, 64, 32)}
for n, most in [(1, 0), (1, 200), (4, 90), (7, 3), (3 * BLOCK // 2, 40), (BLOCK + 7, 2000)]:
    lens = torch.randint(0, most + 1, (n,), generator=g)
    lens[torch.rand(n, generator=g) < 0.2] = 0
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    cases[f"{n} segments up to {most} int32 C16"] = (cu.to(torch.int32), 1, int(cu[-1]), 16)
    cases[f"{n} segments up to {most} C64"] = (cu, 1, int(cu[-1]), 64)
out = {}
for name, (cu, B, T, C) in cases.items():
    info, seg, NC = chunk_map(cu, B, T, C, cpu)
    want = chunk_map_reference(uniform_cu_seqlens(B, T, cpu) if cu is None else cu, B * T, C)
    out[name] = dict(same=NC == want[2] and torch.equal(info, want[0]) and torch.equal(seg, want[1]),
                     chunks=NC, dtypes=[str(info.dtype), str(seg.dtype)])
info, seg, NC = chunk_map(torch.tensor([0, 0, 70, 71, 71, 200]), 1, 200, 64, cpu)
out["explicit"] = dict(info=info.tolist(), seg=seg.tolist(), chunks=NC)
print(json.dumps(out))
"""


def test_chunk_map_matches_the_reference_under_the_interpreter():
    r = run_snippet(WORKER, timeout=300)
    explicit = r.pop("explicit")
    assert len(r) == 15 and all(c["same"] and c["dtypes"] == ["torch.int64"] * 2 for c in r.values()), r
    assert max(c["chunks"] for c in r.values()) > 1024  # more than two blocks of chunks
    # segments: (first chunk, end chunk, first token, end token); chunks: (first token, valid tokens); the
    # padded axis has ceil((200 + 5 * 63) / 64) = 9 chunks, the last three past every segment
    assert explicit["seg"] == [[0, 0, 0, 0], [0, 2, 0, 70], [2, 3, 70, 71], [3, 3, 71, 71], [3, 6, 71, 200]]
    assert explicit["chunks"] == 9
    assert explicit["info"] == [[0, 64], [64, 6], [70, 1], [71, 64], [135, 64], [199, 1], [263, 0], [327, 0],
                                [391, 0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("segments", [1, 40, 5000])
def test_chunk_map_on_cuda(segments):
    from momtitan.ops.triton.chunk_map import chunk_map, chunk_map_reference

    lens = torch.randint(0, 3000, (segments,), device="cuda")
    lens[torch.rand(segments, device="cuda") < 0.3] = 0
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    total = int(cu[-1])
    got = chunk_map(cu, 1, total, 64, cu.device)
    want = chunk_map_reference(cu, total, 64)
    assert got[2] == want[2] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
