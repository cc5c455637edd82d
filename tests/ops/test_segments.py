import torch

from momtitan.ops.segments import bucket_of_index, token_segments


def test_bucket_of_index_eager_and_compiled_equal_searchsorted():
    """Eager it is searchsorted; compiled, a compare-and-count (inductor cannot lower searchsorted
    on a view on CUDA in torch 2.11): both give searchsorted's answer, also on a sliced input."""
    compiled = torch.compile(lambda cu, n: bucket_of_index(cu[1:], n), backend="aot_eager", fullgraph=True)
    for n in (1, 7, 64):
        for _ in range(5):
            ends = torch.sort(torch.randint(0, n + 3, (torch.randint(2, 9, ()).item(),))).values
            expected = torch.searchsorted(ends[1:].contiguous(), torch.arange(n), right=True)
            assert torch.equal(bucket_of_index(ends[1:], n), expected)
            assert torch.equal(compiled(ends, n), expected)


def test_token_segments_skips_empty_segments():
    cu = torch.tensor([0, 2, 2, 5, 5, 6])
    assert token_segments(cu, 6).tolist() == [0, 0, 2, 2, 2, 4]
