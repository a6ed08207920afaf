"""The public ops mixops.atm_sample / mixops.atm_fc: against the reference in every dtype,
strided inputs, gradients, gradcheck, opcheck, validation and backend plumbing.

Every test that takes ``backend`` runs once per backend registered for its ``op`` mark
(tests/conftest.py); the other side of each comparison is the float64 reference."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.reference import atm as R
from mixops_testing import assert_close, cpu_and_cuda, only_backends, skip_unless_runs
from test_atm_cases import away_from_integers, make_offset

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, share, axis, kind="normal1", c_out=7, dtype=torch.float64, device="cpu"):
    B, H, W, C = shape
    x = torch.randn(shape, dtype=torch.float64)
    off = make_offset(kind, (B, H, W, C // share), axis) * (1.3 if kind.startswith("normal") else 1)
    w = torch.randn(c_out, C, dtype=torch.float64) / C**0.5
    b = torch.randn(c_out, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, off, w, b)]


# --- forward against the float64 reference ---------------------------------------------------


@pytest.mark.op("atm_sample")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", [1, 2, 4, 8])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_sample_matches_reference(axis, share, dtype, device, backend):
    skip_unless_runs("atm_sample", backend, device)
    x, off, _, _ = _inputs((2, 5, 7, 16), share, axis, kind="normal5", dtype=dtype, device=device)
    # the float64 reference sees exactly the (rounded) values the op sees
    x64, off64 = (t.double().cpu() for t in (x, off))
    out = mixops.atm_sample(x, off, axis=axis, share=share, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert_close(out, R.atm_sample(x64, off64, axis, share), dtype, name="atm_sample")


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", [1, 2, 4, 8])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_fc_matches_reference(axis, share, dtype, device, backend):
    skip_unless_runs("atm_fc", backend, device)
    x, off, w, b = _inputs((2, 5, 7, 16), share, axis, kind="normal5", dtype=dtype, device=device)
    x64, off64, w64, b64 = (t.double().cpu() for t in (x, off, w, b))
    out = mixops.atm_fc(x, off, w, b, axis=axis, share=share, backend=backend)
    assert out.dtype == dtype and out.shape == (2, 5, 7, 7) and out.device == x.device
    assert_close(out, R.atm_fc(x64, off64, w64, b64, axis, share), dtype, name="atm_fc")
    out = mixops.atm_fc(x, off, w, axis=axis, share=share, backend=backend)
    assert_close(out, R.atm_fc(x64, off64, w64, None, axis, share), dtype, name="atm_fc no bias")


@pytest.mark.op("atm_sample")
@pytest.mark.parametrize("kind", ["integer", "edges"])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_sample_exact_positions(kind, axis, backend):
    """At exact integer positions (and exactly -1 / n) the gather is a copy or an exact 0."""
    skip_unless_runs("atm_sample", backend, "cpu")
    x, off, _, _ = _inputs((2, 4, 6, 8), 2, axis, kind=kind)
    out = mixops.atm_sample(x, off, axis=axis, share=2, backend=backend)
    assert torch.equal(out, R.atm_sample(x, off, axis, 2))


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("kind", ["integer", "edges"])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_fc_exact_positions(kind, axis, backend):
    skip_unless_runs("atm_fc", backend, "cpu")
    x, off, w, b = _inputs((2, 4, 6, 8), 2, axis, kind=kind)
    out = mixops.atm_fc(x, off, w, b, axis=axis, share=2, backend=backend)
    assert_close(out, R.atm_fc(x, off, w, b, axis, 2))


def _strided():
    """Channels-last views of NCHW storage, sliced offsets, a transposed weight, a strided
    bias; and their dense copies for the reference."""
    B, H, W, C, share = 2, 5, 3, 12, 4
    x_nchw = torch.randn(B, C, H, W, dtype=torch.float64)
    x = x_nchw.permute(0, 2, 3, 1)
    big = torch.randn(B, 2 * C // share, H, W, dtype=torch.float64) * 2
    off = big.permute(0, 2, 3, 1)[..., C // share:]  # the H half of an official-style tensor
    w = torch.randn(C, 9, dtype=torch.float64).t()
    b = torch.randn(18, dtype=torch.float64)[::2]
    assert not (x.is_contiguous() or off.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    return (x, off, w, b), [t.contiguous() for t in (x, off, w, b)], share


@pytest.mark.op("atm_sample")
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_sample_strided_inputs(axis, backend):
    skip_unless_runs("atm_sample", backend, "cpu")
    (x, off, _, _), dense, share = _strided()
    out = mixops.atm_sample(x, off, axis=axis, share=share, backend=backend)
    assert_close(out, R.atm_sample(dense[0], dense[1], axis, share), name="atm_sample")


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_fc_strided_inputs(axis, backend):
    skip_unless_runs("atm_fc", backend, "cpu")
    (x, off, w, b), dense, share = _strided()
    out = mixops.atm_fc(x, off, w, b, axis=axis, share=share, backend=backend)
    assert_close(out, R.atm_fc(*dense, axis, share), name="atm_fc")


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("share", [1, 4])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_fc_gradients_match_reference(axis, share, bias, backend):
    skip_unless_runs("atm_fc", backend, "cpu")
    x, off, w, b = _inputs((2, 4, 5, 8), share, axis, kind="normal5")
    b = b if bias else None
    leaves = [t.requires_grad_() for t in (x, off, w, b) if t is not None]
    g = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    got = torch.autograd.grad(mixops.atm_fc(x, off, w, b, axis=axis, share=share, backend=backend), leaves, g)
    want = torch.autograd.grad(R.atm_fc(x, off, w, b, axis, share), leaves, g)
    assert len(got) == len(want) == len(leaves)
    for name, a, e in zip(["x", "offset", "weight", "bias"], got, want):
        assert_close(a, e, name=f"atm_fc grad {name}")


@pytest.mark.op("atm_sample")
@pytest.mark.parametrize("share", [1, 4])
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_sample_gradients_match_reference(axis, share, backend):
    skip_unless_runs("atm_sample", backend, "cpu")
    x, off, _, _ = _inputs((2, 4, 5, 8), share, axis, kind="normal5")
    leaves = [x.requires_grad_(), off.requires_grad_()]
    g = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    got = torch.autograd.grad(mixops.atm_sample(x, off, axis=axis, share=share, backend=backend), leaves, g)
    want = torch.autograd.grad(R.atm_sample(x, off, axis, share), leaves, g)
    for name, a, e in zip(["x", "offset"], got, want):
        assert_close(a, e, name=f"atm_sample grad {name}")


def _determinism_shape(device):
    # on a GPU, enough positions gather from the same source to expose unordered atomics
    return (2, 6, 6, 8) if device == "cpu" else (8, 28, 28, 64)


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_atm_fc_backward_is_deterministic(dtype, device, backend):
    skip_unless_runs("atm_fc", backend, device)
    shape = _determinism_shape(device)
    x, off, w, b = _inputs(shape, 2, "w", kind="normal5", dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (x, off, w, b)]
    g = torch.randn(*shape[:-1], 7, dtype=dtype, device=device)
    runs = [
        torch.autograd.grad(mixops.atm_fc(x, off, w, b, axis="w", share=2, backend=backend), leaves, g)
        for _ in range(2)
    ]
    for name, a, e in zip(["x", "offset", "weight", "bias"], *runs):
        assert torch.equal(a, e), f"grad {name} differs between two runs"


@pytest.mark.op("atm_sample")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_atm_sample_backward_is_deterministic(dtype, device, backend):
    skip_unless_runs("atm_sample", backend, device)
    shape = _determinism_shape(device)
    x, off, _, _ = _inputs(shape, 2, "h", kind="normal5", dtype=dtype, device=device)
    leaves = [x.requires_grad_(), off.requires_grad_()]
    g = torch.randn(shape, dtype=dtype, device=device)
    runs = [
        torch.autograd.grad(mixops.atm_sample(x, off, axis="h", share=2, backend=backend), leaves, g)
        for _ in range(2)
    ]
    for name, a, e in zip(["x", "offset"], *runs):
        assert torch.equal(a, e), f"grad {name} differs between two runs"


def _gradcheck_inputs():
    B, H, W, C, share = 1, 3, 4, 4, 2
    x = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    off = away_from_integers((B, H, W, C // share)).requires_grad_()
    w = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    return x, off, w, b, share


@pytest.mark.op("atm_sample")
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_sample_gradcheck(axis, backend):
    skip_unless_runs("atm_sample", backend, "cpu")
    x, off, _, _, share = _gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda a, o: mixops.atm_sample(a, o, axis=axis, share=share, backend=backend), (x, off), fast_mode=True
    )


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_fc_gradcheck(axis, backend):
    skip_unless_runs("atm_fc", backend, "cpu")
    x, off, w, b, share = _gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda a, o, ww, bb: mixops.atm_fc(a, o, ww, bb, axis=axis, share=share, backend=backend),
        (x, off, w, b),
        fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda a, o, ww: mixops.atm_fc(a, o, ww, axis=axis, share=share, backend=backend),
        (x, off, w),
        fast_mode=True,
    )


@pytest.mark.op("atm_sample")
def test_atm_sample_opcheck(backend):
    skip_unless_runs("atm_sample", backend, "cpu")
    x, off, _, _ = _inputs((2, 3, 4, 8), 4, "h", kind="normal1")
    x.requires_grad_()
    off.requires_grad_()
    for axis in ("h", "w"):
        torch.library.opcheck(torch.ops.mixops.atm_sample.default, (x, off, axis, 4, backend))


@pytest.mark.op("atm_fc")
@pytest.mark.parametrize("with_bias", [True, False])
def test_atm_fc_opcheck(with_bias, backend):
    skip_unless_runs("atm_fc", backend, "cpu")
    x, off, w, b = _inputs((2, 3, 4, 8), 4, "w", kind="normal1")
    for t in (x, off, w, b):
        t.requires_grad_()
    torch.library.opcheck(
        torch.ops.mixops.atm_fc.default, (x, off, w, b if with_bias else None, "w", 4, backend)
    )


def test_backend_plumbing(monkeypatch):
    # pretend only the reference exists, so the message's list does not depend on the kernels
    only_backends(monkeypatch, "atm_sample", "torch")
    only_backends(monkeypatch, "atm_fc", "torch")
    x, off, w, b = _inputs((1, 2, 3, 4), 1, "w")
    with pytest.raises(ValueError, match="available: torch"):
        mixops.atm_sample(x, off, axis="w", backend="triton")
    with pytest.raises(ValueError, match="available: torch"):
        mixops.atm_fc(x, off, w, b, axis="w", backend="triton")
    with pytest.raises(ValueError, match="backend"):
        mixops.atm_fc(x, off, w, b, axis="w", backend="fast")
    with mixops.use_backend("torch"):
        assert torch.equal(mixops.atm_sample(x, off, axis="w"), R.atm_sample(x, off, "w", 1))
    assert mixops.available_backends("atm_fc") == ("torch",)
    assert mixops.available_backends("atm_sample") == ("torch",)



# --- validation: every documented error names its argument -----------------------------------


def _good():
    x = torch.randn(2, 3, 4, 8)
    return x, torch.randn(2, 3, 4, 4), torch.randn(5, 8), torch.randn(5)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, "x"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "x"),
        (lambda a: a.update(x=[1.0]), TypeError, "x"),
        (lambda a: a.update(offset=a["offset"][0]), ValueError, "offset"),
        (lambda a: a.update(offset=torch.randn(2, 3, 4, 8)), ValueError, "offset"),
        (lambda a: a.update(offset=torch.randn(2, 4, 3, 4)), ValueError, "offset"),
        (lambda a: a.update(offset=a["offset"].double()), TypeError, "offset"),
        (lambda a: a.update(offset=a["offset"].to("meta")), ValueError, "offset"),
        (lambda a: a.update(axis="c"), ValueError, "axis"),
        (lambda a: a.update(axis=1), ValueError, "axis"),
        (lambda a: a.update(share=3), ValueError, "share"),
        (lambda a: a.update(share=0), ValueError, "share"),
        (lambda a: a.update(share=2.0), TypeError, "share"),
    ],
)
def test_gather_errors(change, exc, match):
    x, off, w, b = _good()
    for fn in ("sample", "fc"):
        args = dict(x=x, offset=off, axis="w", share=2)
        change(args)
        with pytest.raises(exc, match=match):
            if fn == "sample":
                mixops.atm_sample(args["x"], args["offset"], axis=args["axis"], share=args["share"])
            else:
                mixops.atm_fc(args["x"], args["offset"], w, b, axis=args["axis"], share=args["share"])


@pytest.mark.parametrize(
    "weight, bias, exc, match",
    [
        (torch.randn(5, 8, 1, 1), None, ValueError, "weight"),
        (torch.randn(5, 7), None, ValueError, "weight"),
        (torch.randn(5, 8).double(), None, TypeError, "weight"),
        (torch.randn(5, 8), torch.randn(4), ValueError, "bias"),
        (torch.randn(5, 8), torch.randn(5, 1), ValueError, "bias"),
        (torch.randn(5, 8), torch.randn(5).half(), TypeError, "bias"),
        (torch.randn(5, 8), torch.randn(5, device="meta"), ValueError, "bias"),
    ],
)
def test_fc_weight_errors(weight, bias, exc, match):
    x, off, _, _ = _good()
    with pytest.raises(exc, match=match):
        mixops.atm_fc(x, off, weight, bias, axis="h", share=2)


def test_weight_and_bias_are_keyword_compatible():
    x, off, w, b = _good()
    out = mixops.atm_fc(x, off, weight=w, bias=b, axis="h", share=2)
    assert out.shape == (2, 3, 4, 5)
    with pytest.raises(TypeError):
        mixops.atm_fc(x, off, w, b, "h")  # axis is keyword-only
