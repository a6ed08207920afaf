"""Internal ops of the fused MorphFC layer path (``mixops.nn.MorphFC_S`` / ``MorphFC_S2``).

``mixops::_morph_branch(x, weight, bias, segment_dim, axis) -> (y, mean)``: one MorphFC branch
(axis "w", "h", "hs", "t", or "c" for the channel FC ``mlp_c``) and the fp32 mean of its output
over the T*H*W tokens, ``[B, C]``, which the reweighting needs. The Triton backend accumulates
the mean in the branch GEMM's epilogue (no second pass over y) and folds the mean's gradient
into the dY load stage of its backward kernels. The ``torch`` backend is
``mixops.reference.morph_fc.morph_branch``.
"""
from __future__ import annotations

import torch

from .. import _validate as v
from ..reference import morph_fc as _ref
from ._define import define_op
from .morph_fc import AXES, _feature_size

__all__ = ["morph_branch"]

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
