import torch

from momtitan.ops.segments import bucket_of_index, token_segments


def test_bucket_of_index_equals_searchsorted():
    for n in (1, 7, 64):
        for _ in range(5):
            ends = torch.sort(torch.randint(0, n + 3, (torch.randint(1, 9, ()).item(),))).values
            expected = torch.searchsorted(ends, torch.arange(n), right=True)
            assert torch.equal(bucket_of_index(ends, n), expected)


def test_token_segments_skips_empty_segments():
    cu = torch.tensor([0, 2, 2, 5, 5, 6])
    assert token_segments(cu, 6).tolist() == [0, 0, 2, 2, 2, 4]
