"""Backend selection: argument > use_backend > MIXOPS_BACKEND > auto, and clear errors."""
import pytest
import torch

import mixops
from mixops import backend

OPS = ["atm_fc", "atm_sample", "dynamixer_mix", "locality_injection", "morph_fc", "partition_fc", "window_attention"]


@pytest.mark.parametrize("op", OPS)
def test_every_public_op_has_the_torch_backend(op):
    assert "torch" in mixops.available_backends(op)
    assert isinstance(getattr(torch.ops.mixops, op), torch._ops.OpOverloadPacket)
    assert isinstance(getattr(torch.ops.mixops, f"{op}_backward"), torch._ops.OpOverloadPacket)


def test_precedence(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("MIXOPS_BACKEND", raising=False)
    assert backend.requested_backend() == "auto"
    assert backend.resolve("morph_fc", None, x) == "torch"
    monkeypatch.setenv("MIXOPS_BACKEND", "triton")
    assert backend.requested_backend() == "triton"
    with mixops.use_backend("torch"):
        assert backend.requested_backend() == "torch"
        assert backend.requested_backend("auto") == "auto"
        with mixops.use_backend("cuda"):
            assert backend.requested_backend() == "cuda"
        assert backend.requested_backend() == "torch"
    assert backend.requested_backend() == "triton"


def test_unavailable_backend_names_what_is_available(monkeypatch):
    monkeypatch.delenv("MIXOPS_BACKEND", raising=False)
    x = torch.randn(1, 2, 2, 4)
    w = torch.randn(4, 4)
    for name in ("triton", "cuda"):
        if name in mixops.available_backends("morph_fc"):
            continue
        with pytest.raises(ValueError, match=r"backend '%s' is not available for mixops.morph_fc; available: torch" % name):
            mixops.morph_fc(x, w, segment_dim=2, axis="w", backend=name)
        with mixops.use_backend(name), pytest.raises(ValueError, match="available: torch"):
            mixops.morph_fc(x, w, segment_dim=2, axis="w")


def test_invalid_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with mixops.use_backend("tritonn"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        mixops.morph_fc(torch.randn(1, 2, 2, 4), torch.randn(4, 4), segment_dim=2, axis="w", backend="gpu")
    monkeypatch.setenv("MIXOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="MIXOPS_BACKEND must be one of"):
        mixops.morph_fc(torch.randn(1, 2, 2, 4), torch.randn(4, 4), segment_dim=2, axis="w")


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.register("morph_fc", "numpy", forward=lambda *a: None, backward=lambda *a: None)


def test_a_registered_backend_is_dispatched_to_forward_and_backward(monkeypatch):
    """A later backend plugs in with register() alone: forward and backward both reach it."""
    monkeypatch.delenv("MIXOPS_BACKEND", raising=False)
    calls = []
    torch_impl = backend.implementation("morph_fc", "torch")

    def fwd(*args):
        calls.append("fwd")
        return torch_impl.forward(*args)

    def bwd(grads, needs, *args):
        calls.append(("bwd", tuple(needs)))
        return torch_impl.backward(grads, needs, *args)

    monkeypatch.setitem(backend._registry["morph_fc"], "triton", backend.Impl(fwd, bwd, lambda t: True))
    x = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, dtype=torch.float64)  # frozen: its gradient is not asked for
    out = mixops.morph_fc(x, w, segment_dim=2, axis="w", backend="triton")
    out.sum().backward()
    assert calls == ["fwd", ("bwd", (True, False, False))]  # x, weight, bias (None)
    assert w.grad is None and x.grad is not None
    ref = mixops.morph_fc(x, w, segment_dim=2, axis="w", backend="torch")
    torch.testing.assert_close(out, ref)


def test_backend_that_cannot_run_on_the_device_is_refused(monkeypatch):
    monkeypatch.delenv("MIXOPS_BACKEND", raising=False)
    impl = backend.implementation("morph_fc", "torch")
    monkeypatch.setitem(
        backend._registry["morph_fc"], "cuda", backend.Impl(impl.forward, impl.backward, lambda t: t.is_cuda)
    )
    with pytest.raises(ValueError, match="backend 'cuda' of mixops.morph_fc cannot run on cpu tensors"):
        mixops.morph_fc(torch.randn(1, 2, 2, 4), torch.randn(4, 4), segment_dim=2, axis="w", backend="cuda")
    # auto on a CPU tensor still picks the reference
    assert backend.resolve("morph_fc", "auto", torch.zeros(1)) == "torch"


def test_auto_skips_backends_registered_outside_auto(monkeypatch):
    """A kernel not yet verified on a GPU runs only when asked for by name."""
    monkeypatch.delenv("MIXOPS_BACKEND", raising=False)
    impl = backend.implementation("morph_fc", "torch")
    everywhere = lambda t: True  # noqa: E731
    monkeypatch.setitem(
        backend._registry["morph_fc"], "cuda", backend.Impl(impl.forward, impl.backward, everywhere, auto=False)
    )
    x = torch.zeros(1)
    assert backend.resolve("morph_fc", "auto", x) == "torch"
    assert backend.resolve("morph_fc", "cuda", x) == "cuda"
