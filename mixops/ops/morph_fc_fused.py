"""Internal ops of the fused MorphFC layer path (``mixops.nn.MorphFC_S`` / ``MorphFC_S2``).

The layer is branch op(s) -> the tiny reweight MLP (torch, in ``mixops.nn.morph_fc``) ->
``_reweighted_proj``; nothing of size ``[B, T, H, W, C]`` is written besides the branches and
the output.

``mixops::_morph_branch(x, weight, bias, segment_dim, axis) -> (y, mean)``: one MorphFC branch
(axis "w", "h", "hs", "t", or "c" for the channel FC ``mlp_c``) and the fp32 mean of its output
over the T*H*W tokens, ``[B, C]``, which the reweighting needs. The Triton backend accumulates
the mean in the branch GEMM's epilogue (no second pass over y) and folds the mean's gradient
into the dY load stage of its backward kernels. The ``torch`` backend is
``mixops.reference.morph_fc.morph_branch``.

``mixops::_reweighted_proj(b0, b1, b2, alpha, weight, bias) -> out``: ``proj`` of
``((b0*a0 + b1*a1) + b2*a2)`` (b2 None for the two-way S2 layer) with alpha ``[B, C, K]`` in
fp32 (fp64 for fp64). The Triton backend forms the weighted sum in the proj GEMM's operand
load (no weighted-sum tensor in HBM); its backward writes the K branch gradients and the
alpha partials from one dA = dOut @ W GEMM's epilogue. The ``torch`` backend is
``mixops.reference.morph_fc.reweighted_proj``.
"""
from __future__ import annotations

import torch

from .. import _validate as v
from ..reference import morph_fc as _ref
from ._define import autocast_args, define_op
from .morph_fc import AXES, _feature_size

__all__ = ["morph_branch", "reweighted_proj"]

BRANCH_AXES = AXES + ("c",)


def _fake(x, weight, bias, segment_dim, axis):
    B, C = x.shape[0], x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((B, C), dtype=torch.promote_types(x.dtype, torch.float32))


_op = define_op(
    "_morph_branch",
    "(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> (Tensor, Tensor)",
    reference=_ref.morph_branch,
    fake=_fake,
)


def morph_branch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    segment_dim: int,
    axis: str,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mean): one MorphFC branch of channels-last ``x`` and its token mean ``[B, C]``
    (fp32; fp64 for fp64). Arguments as ``mixops.morph_fc``, plus axis ``"c"``: the channel
    FC (``weight [C, C]``, ``bias [C]`` by output channel; ``segment_dim`` unused)."""
    x, weight, bias = autocast_args("lower", x, weight, bias)
    v.check_choice("axis", axis, BRANCH_AXES)
    v.check_tensor("x", x, ndim=5 if axis == "t" else (4, 5))
    v.check_int("segment_dim", segment_dim)
    v.check_tensor("weight", weight, ndim=2)
    v.check_like("weight", weight, "x", x)
    n = x.shape[-1] if axis == "c" else _feature_size(x, segment_dim, axis)
    if tuple(weight.shape) != (n, n):
        raise ValueError(f"weight must have shape ({n}, {n}) for axis {axis!r}, got {tuple(weight.shape)}")
    v.check_optional("bias", bias, "x", x, (n,))
    return _op(x, weight, bias, segment_dim, axis, backend=backend)


morph_branch.op = _op.op
morph_branch.backward_op = _op.backward_op


def _proj_fake(b0, b1, b2, alpha, weight, bias):
    return b0.new_empty(b0.shape)


_proj_op = define_op(
    "_reweighted_proj",
    "(Tensor b0, Tensor b1, Tensor? b2, Tensor alpha, Tensor weight, Tensor? bias) -> Tensor",
    reference=_ref.reweighted_proj,
    fake=_proj_fake,
)


def reweighted_proj(
    branches: list[torch.Tensor] | tuple[torch.Tensor, ...],
    alpha: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``proj(sum_k alpha_k * branch_k)`` summed in branch order: 2 or 3 branches of one shape
    ``[B, H, W, C]`` / ``[B, T, H, W, C]``, alpha ``[B, C, K]`` (fp32; fp64 for fp64 branches,
    not autocast), weight ``[C, C]``, bias ``[C]`` or None. Returns the branches' shape and
    dtype."""
    if not isinstance(branches, (list, tuple)) or len(branches) not in (2, 3):
        raise ValueError(f"branches must be a list of 2 or 3 tensors, got {type(branches).__name__}")
    *branches, weight, bias = autocast_args("lower", *branches, weight, bias)
    b0 = v.check_tensor("branches[0]", branches[0], ndim=(4, 5))
    for i, b in enumerate(branches[1:], 1):
        v.check_tensor(f"branches[{i}]", b)
        v.check_like(f"branches[{i}]", b, "branches[0]", b0)
        if b.shape != b0.shape:
            raise ValueError(f"branches[{i}] must have the shape of branches[0] {tuple(b0.shape)}, got {tuple(b.shape)}")
    B, C, K = b0.shape[0], b0.shape[-1], len(branches)
    v.check_branch_weights(alpha, "branches[0]", b0, (B, C, K))
    v.check_tensor("weight", weight, ndim=2)
    v.check_like("weight", weight, "branches[0]", b0)
    v.check_shape("weight", weight, (C, C))
    v.check_optional("bias", bias, "branches[0]", b0, (C,))
    b2 = branches[2] if K == 3 else None
    return _proj_op(b0, branches[1], b2, alpha, weight, bias, backend=backend)


reweighted_proj.op = _proj_op.op
reweighted_proj.backward_op = _proj_op.backward_op
