"""The benchmark baselines that are not the literal reference compute the reference's numbers."""
import pytest
import torch

from mixops.reference import window_attention as R
from mixops_testing import assert_close


@pytest.mark.parametrize("padding", ["bias", "mask"])
@pytest.mark.parametrize("window_size, H, W", [(3, 5, 7), (4, 4, 8), (5, 3, 2), (None, 4, 6)])
def test_window_attention_sdpa_matches_reference(padding, window_size, H, W):
    qkv = torch.randn(2, H, W, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    want = R.window_attention(qkv, 2, window_size, 0.3, padding, bias)
    got = R.window_attention_sdpa(qkv, 2, window_size, 0.3, padding, bias)
    assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (qkv, bias), g, allow_unused=True),
                    torch.autograd.grad(want, (qkv, bias), g, allow_unused=True)):
        if b is None:
            assert a is None or not a.any()
        else:
            assert_close(a, b)
