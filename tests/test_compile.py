"""Every public op compiles with Inductor without a graph break, forward and backward, and
gives the eager numbers (the custom op + fake kernel + autograd contract of DESIGN.md).

Inductor, unlike the eager-style backends, checks that real outputs have the strides of the
fake kernels, forward and backward; the inputs include channels-last and transposed views."""
import pytest
import torch

import mixops


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _view(B, H, W, C):
    """A channels-last view of an NCHW tensor: [B, H, W, C] with non-trivial strides."""
    return torch.randn(B, C, H, W, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()


CASES = {
    "morph_fc": lambda: (mixops.morph_fc, (_r(2, 4, 6, 12), _r(12, 12), _r(12)), dict(segment_dim=4, axis="h")),
    "morph_fc_no_bias_views": lambda: (
        lambda x, w, **kw: mixops.morph_fc(x, w, **kw),
        (_view(2, 4, 6, 12), _r(12, 12).t()),
        dict(segment_dim=4, axis="hs"),
    ),
    "atm_sample": lambda: (mixops.atm_sample, (_r(2, 5, 6, 8), _r(2, 5, 6, 4)), dict(axis="w", share=2)),
    "atm_fc": lambda: (mixops.atm_fc, (_r(2, 5, 6, 8), _r(2, 5, 6, 8), _r(6, 8), _r(6)), dict(axis="h")),
    "dynamixer_mix": lambda: (
        mixops.dynamixer_mix, (_r(3, 5, 8), _r(4, 8), _r(4), _r(25, 10), _r(25)), dict(num_head=2, reduced_dim=2)
    ),
    "window_attention": lambda: (
        mixops.window_attention, (_r(2, 5, 7, 24),), dict(num_heads=2, window_size=3, qkv_bias=_r(24))
    ),
    "partition_fc": lambda: (
        mixops.partition_fc, (_r(2, 8, 6, 6), _r(2 * 9, 9, 1, 1), _r(18)), dict(partition=(3, 3), num_sharesets=2)
    ),
    "locality_injection": lambda: (
        mixops.locality_injection, (_r(2 * 9, 9, 1, 1), _r(18), _r(2, 1, 3, 3), _r(2)), dict(partition=(3, 3))
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fullgraph_compile_matches_eager(name):
    op, args, kwargs = CASES[name]()

    def f(*a):
        out = op(*a, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        return sum((o * o).sum() for o in outs)

    eager = f(*args)
    eager_grads = torch.autograd.grad(eager, args)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, eager)
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e)
