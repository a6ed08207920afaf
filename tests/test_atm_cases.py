"""Input generators shared by the ATM tests (offset distributions of docs/atm.md section 11.2), and checks
that they produce what the other tests rely on."""
from __future__ import annotations

import torch

KINDS = ("normal1", "normal5", "integer", "edges")
AXIS_DIM = {"h": 1, "w": 2}


def make_offset(kind: str, shape, axis: str, dtype=torch.float64) -> torch.Tensor:
    """Compact offsets ``[B,H,W,G]`` of one distribution, for sampling along ``axis``.

    normal1 / normal5: N(0, 1) / N(0, 5) pixels (many samples out of bounds);
    integer: exact integers in [-n-1, n+1]; edges: positions exactly -1 or n, with some
    exact in-range integers mixed in.
    """
    dim = AXIS_DIM[axis]
    n = shape[dim]
    if kind == "normal1":
        return torch.randn(shape, dtype=dtype)
    if kind == "normal5":
        return torch.randn(shape, dtype=dtype) * 5
    if kind == "integer":
        return torch.randint(-n - 1, n + 2, shape).to(dtype)
    view = [1, 1, 1, 1]
    view[dim] = n
    pos = torch.arange(n).view(view).expand(shape)
    choice = torch.randint(0, 3, shape)
    target = torch.where(choice == 0, -1, torch.where(choice == 1, n, torch.randint(0, n, shape)))
    return (target - pos).to(dtype)


def strided_inputs(shape, share, axis, kind, dtype=torch.float64, device="cpu"):
    """x as a channels-last view of NCHW storage, offsets (of distribution ``kind``) as a strided
    slice of a wider tensor: kernels must go by strides. Values are drawn in float64 and rounded
    once to ``dtype``."""
    B, H, W, C = shape
    x = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype).permute(0, 2, 3, 1)
    off = make_offset(kind, (B, H, W, C // share), axis)
    wide = torch.randn(B, H, W, 2 * (C // share), dtype=torch.float64)
    wide[..., 1::2] = off
    off = wide.to(dtype)[..., 1::2]
    return x.to(device), off.to(device)


def away_from_integers(shape, dtype=torch.float64) -> torch.Tensor:
    """Offsets whose positions keep a fractional part in [0.15, 0.85]: no kink within a
    finite-difference step, so gradcheck sees a smooth function."""
    whole = torch.randint(-3, 3, shape).to(dtype)
    return whole + 0.15 + 0.7 * torch.rand(shape, dtype=dtype)


def official_atm_op(input, offset, weight, bias, dimension):
    """The official ATMOp body (docs/atm.md section 5), written from that section: NCHW input, offset [B,C,H,W]."""
    from torchvision.ops import deform_conv2d

    B, C, H, W = input.shape
    offset_t = torch.zeros(B, 2 * C, H, W, dtype=input.dtype)
    if dimension == "w":
        offset_t[:, 1::2] += offset
    else:
        offset_t[:, 0::2] += offset
    return deform_conv2d(input, offset_t, weight, bias)


def test_edges_land_exactly_on_minus_one_and_n():
    for axis in ("h", "w"):
        off = make_offset("edges", (2, 5, 7, 3), axis)
        dim = AXIS_DIM[axis]
        n = off.shape[dim]
        view = [1, 1, 1, 1]
        view[dim] = n
        p = torch.arange(n, dtype=off.dtype).view(view) + off
        assert torch.equal(p, p.round())
        assert (p == -1).any() and (p == n).any() and ((p >= 0) & (p < n)).any()
        assert ((p >= -1) & (p <= n)).all()


def test_away_from_integers_keeps_a_fractional_part():
    off = away_from_integers((2, 3, 4, 5))
    frac = off - off.floor()
    assert (frac >= 0.15).all() and (frac <= 0.85).all()
