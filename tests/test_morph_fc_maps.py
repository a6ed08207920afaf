"""The two implementations of the MorphFC chunk index map agree exactly.

The Triton kernels (kernels/morph_fc.py: _row_part / _feat_part / _combine) and the CUDA kernels
(csrc/morph_fc_map.cuh: row_part / feature_part / combine) each write the map of every axis
once. Here both run on the same strided inputs -- the Triton backend under the interpreter, the
CUDA header through the extension's CPU build (``torch.ops.mixops._morph_fc_cuda`` on CPU
tensors runs csrc/morph_fc_cpu.cpp, whose loops call the header the GPU kernels call) -- and
their forward and dX / dW / db must be bit-identical, to each other and to the float64
reference. Inputs, weights and incoming gradients are small integers in float64, so every
product and every sum (any order, any split) is exact: a single misplaced element is a
difference, never a rounding.
"""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.backend import implementation
from mixops.reference import morph_fc as ref

f64 = torch.float64

pytestmark = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)

# name -> (x shape, segment_dim, axis). Images (4-D) and clips (5-D); chunks that wrap across
# rows / columns (W = 6, L = 8; H = 5, L = 10), "hs" with several strided chunks per frame,
# widths F that are no power of two (6, 15, 20, 84), the stage-1 pattern C = 84, L = 14 on a 4 x 7
# frame, temporal groups with T = 3 and T = 5.
CASES = {
    "w-image": ((2, 4, 6, 16), 8, "w"),
    "h-image": ((2, 4, 6, 16), 8, "h"),
    "hs-image": ((2, 4, 6, 16), 8, "hs"),
    "w-video": ((1, 3, 5, 4, 20), 10, "w"),
    "h-video": ((1, 3, 5, 4, 20), 10, "h"),
    "hs-video": ((2, 2, 4, 6, 12), 6, "hs"),
    "w-c84": ((1, 4, 7, 84), 14, "w"),
    "h-c84": ((1, 4, 7, 84), 14, "h"),
    "t-3": ((2, 3, 2, 3, 8), 4, "t"),
    "t-5": ((1, 5, 3, 2, 12), 4, "t"),
}


def _ints(*shape: int) -> torch.Tensor:
    return torch.randint(-3, 4, shape).to(f64)


def _layouts(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """x of ``shape`` in two non-contiguous layouts: the channels-last view of a channels-first
    tensor, and a channel slice (offset, row pitch C + 3) of a wider one."""
    *lead, C = shape
    first = _ints(lead[0], C, *lead[1:])
    wide = _ints(*lead, C + 3)
    return {
        "channels-first": first.permute(0, *range(2, len(shape)), 1),
        "channel-slice": wide[..., 2 : 2 + C],
    }


def _width(shape, L, axis):
    return shape[1] * shape[-1] // L if axis == "t" else shape[-1]


@pytest.mark.parametrize("layout", ["channels-first", "channel-slice"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_and_cuda_maps_agree_exactly(case, layout):
    shape, L, axis = CASES[case]
    x = _layouts(shape)[layout]
    F = _width(shape, L, axis)
    w = _ints(F, F).t()  # transposed view
    b = _ints(2 * F)[::2]  # strided
    # the incoming grad as autograd hands over a broadcast: stride 0 along H
    h = len(shape) - 3
    g = _ints(*shape[:h], 1, *shape[h + 1 :]).expand(shape)
    assert not x.is_contiguous() and not w.is_contiguous() and g.stride(h) == 0

    triton = implementation("morph_fc", "triton")
    cuda_fwd, cuda_bwd = torch.ops.mixops._morph_fc_cuda, torch.ops.mixops._morph_fc_cuda_backward
    outputs = {
        "triton": [triton.forward(x, w, b, L, axis), *triton.backward([g], [True, True, True], x, w, b, L, axis)],
        "cuda header": [cuda_fwd(x, w, b, L, axis), *cuda_bwd([g], [True, True, True], x, w, b, L, axis)],
    }
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = ref.morph_fc(*leaves, L, axis)
    outputs["reference"] = [out.detach(), *torch.autograd.grad(out, leaves, g)]

    names = ("output", "grad x", "grad weight", "grad bias")
    for impl, got in outputs.items():
        assert len(got) == 4, impl
        for name, a, e in zip(names, got, outputs["triton"]):
            assert a.shape == e.shape and a.dtype == f64, (impl, name)
            assert torch.equal(a, e), f"{name}: {impl} differs from triton at {int((a != e).sum())} elements"
