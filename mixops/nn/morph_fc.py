"""Drop-in MorphMLP modules: ``Mlp``, ``MorphFC_S``, ``MorphFC_S2``, ``MorphFC_T``,
``PermutatorBlock`` (and a small ``DropPath``).

Class names, constructor arguments and defaults, child names and registration order follow
``MTLab/MorphMLP`` ``slowfast/models/morphmlp.py`` (and ``morphmlp_32.py`` for the 32-frame
temporal rule), so official state_dicts load with ``strict=True``. The chunked token FCs run
through ``mixops.morph_fc`` (and so through the selected backend); the channel FC, reweighting
and projections are plain torch.

Fused layer path: when the backend ``mixops.morph_fc`` resolves to for x also implements the
internal ops of ``mixops.ops.morph_fc_fused`` (torch, triton, cuda), ``MorphFC_S`` / ``MorphFC_S2``
run branch ops that return each branch's fp32 token mean with it, the reweight MLP on those
means, and ``_reweighted_proj`` (the weighted sum formed inside the proj GEMM). Otherwise (a
backend with ``morph_fc`` alone) the unfused path through the public op.

Layout is channels-last: ``[B, T, H, W, C]`` (official video layout). ``MorphFC_S`` and
``MorphFC_S2`` also take images ``[B, H, W, C]`` (T = 1); ``MorphFC_T`` and
``PermutatorBlock`` need the clip axis T.

Extension over the official code: ``MorphFC_T`` and ``PermutatorBlock`` take a keyword-only
``frames`` (16 or 32, default 16) choosing which official file's hard-coded temporal group
rule applies -- ``frames=16``: G = 8, ``mlp_t`` is ``[C, C]`` (morphmlp.py, needs T = 8);
``frames=32``: G = 16, or G = 14 with ``mlp_t`` ``[448, 448]`` when ``dim == 392``
(morphmlp_32.py, needs T = 16). As in the official code, ``segment_dim`` does not affect
``MorphFC_T``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import _validate as v
from ..backend import fused_backend
from ..ops.morph_fc import morph_fc
from ..ops.morph_fc_fused import morph_branch, reweighted_proj
from ._layers import DropPath, Mlp, reweighted_sum

__all__ = ["DropPath", "Mlp", "MorphFC_S", "MorphFC_S2", "MorphFC_T", "PermutatorBlock"]

FRAMES = (16, 32)


def _check_input(module: nn.Module, x: torch.Tensor, dim: int, ranks) -> None:
    name = type(module).__name__
    v.check_tensor("x", x, ndim=ranks)
    if x.shape[-1] != dim:
        raise ValueError(f"x must have {dim} channels (last axis) for this {name}, got shape {tuple(x.shape)}")


_FUSED_OPS = ("_morph_branch", "_reweighted_proj")


def _fused_layer(m: nn.Module, x5: torch.Tensor, branches, backend: str) -> torch.Tensor:
    """proj(reweighted sum) of the branches ``(linear, axis)`` of m, in the official add order:
    branch outputs with their fp32 token means (summed in branch order: the mean of the
    branch sum), the reweight MLP on the mean rounded to x's dtype, as the official module
    rounds it, the softmax over branches in fp32, then the fused weighted sum + proj."""
    ys, mean = [], None
    for lin, axis in branches:
        y, mu = morph_branch(x5, lin.weight, lin.bias, segment_dim=m.segment_dim, axis=axis, backend=backend)
        ys.append(y)
        mean = mu if mean is None else mean + mu
    B, C, K = x5.shape[0], x5.shape[-1], len(ys)
    r = m.reweight(mean.to(ys[0].dtype))
    alpha = r.reshape(B, C, K).to(mean.dtype).softmax(dim=2)
    return reweighted_proj(ys, alpha, m.proj.weight, m.proj.bias, backend=backend)


def _spatial_forward(m: nn.Module, x: torch.Tensor, branches) -> torch.Tensor:
    """MorphFC_S / MorphFC_S2 forward over the branches ``(linear, axis)`` (axis "c": the
    channel FC), in the official branch order: the fused path when the backend ``morph_fc``
    resolves to has its internal ops, else the public ops then the reweighted sum and proj."""
    _check_input(m, x, m.proj.in_features, (4, 5))
    x5 = x if x.dim() == 5 else x.unsqueeze(1)
    backend = fused_backend("morph_fc", _FUSED_OPS, x5)
    if backend is not None:
        y = _fused_layer(m, x5, branches, backend)
    else:
        ys = [
            lin(x5) if axis == "c"
            else morph_fc(x5, lin.weight, lin.bias, segment_dim=m.segment_dim, axis=axis)
            for lin, axis in branches
        ]
        y = m.proj(reweighted_sum(m.reweight, ys))
    return m.proj_drop(y).reshape(x.shape)


class MorphFC_S(nn.Module):
    """Spatial MorphFC of stages 1-3: H and W chunked token FCs, a channel FC, reweighting.

    x: ``[B, T, H, W, C]`` or ``[B, H, W, C]`` with ``C == dim``, ``C % segment_dim == 0``,
    ``(H*W) % segment_dim == 0``; returns x's shape. ``qk_scale`` and ``attn_drop`` are
    accepted and unused, as in the official module.
    """

    def __init__(self, dim, segment_dim=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_h = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_w = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _spatial_forward(self, x, [(self.mlp_h, "h"), (self.mlp_w, "w"), (self.mlp_c, "c")])


class MorphFC_S2(nn.Module):
    """Spatial MorphFC of stage 4: strided-chunk token FC ("hs") and a channel FC, two-way
    reweighting; no ``mlp_w``. ``mlp_c`` is registered before ``mlp_h`` (official order).

    x: ``[B, T, H, W, C]`` or ``[B, H, W, C]``, constraints as :class:`MorphFC_S`.
    """

    def __init__(self, dim, segment_dim=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_h = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _spatial_forward(self, x, [(self.mlp_h, "hs"), (self.mlp_c, "c")])


def temporal_groups(dim: int, frames: int) -> tuple[int, int]:
    """(G, F): the channel-group count and ``mlp_t`` width the official file for ``frames``
    hard-codes (16: morphmlp.py; 32: morphmlp_32.py, with its dim == 392 special case)."""
    v.check_choice("frames", frames, FRAMES)
    if frames == 16:
        return 8, dim
    if dim == 392:
        return 14, 392 // 14 * 16
    return 16, dim


class MorphFC_T(nn.Module):
    """Temporal MorphFC: a token FC over the whole clip per channel group, then ``proj``.

    x: ``[B, T, H, W, C]`` with ``C == dim`` and ``T * C / G == mlp_t.in_features``
    (T = 8 for ``frames=16``, T = 16 for ``frames=32``). ``segment_dim`` is ignored like in
    the official module; ``frames`` (keyword-only, extension) picks the group rule, see the
    module docstring.
    """

    def __init__(
        self, dim, segment_dim=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, *, frames=16
    ):
        super().__init__()
        self.segment_dim, width = temporal_groups(dim, frames)
        self.frames = frames
        self.mlp_t = nn.Linear(width, width, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.proj.in_features, 5)
        frames = self.mlp_t.in_features * self.segment_dim // x.shape[-1]
        if x.shape[1] != frames:
            # mlp_t mixes the whole clip: its width fixes the number of frames
            raise ValueError(
                f"x must have T = {frames} frames (x.shape[1]) for this MorphFC_T (frames={self.frames}), "
                f"got shape {tuple(x.shape)}"
            )
        # No fused path: there is no reweighting (so no mean to accumulate), and proj cannot
        # join the t-branch GEMM -- a t-GEMM row is one (token, channel group) over the whole
        # clip while proj mixes all groups of one token, which sit in G different rows -- so
        # the layer is the branch GEMM then one plain [C, C] GEMM either way.
        t = morph_fc(x, self.mlp_t.weight, self.mlp_t.bias, segment_dim=self.segment_dim, axis="t")
        return self.proj_drop(self.proj(t))


class PermutatorBlock(nn.Module):
    """MorphMLP block: temporal MorphFC feeding the spatial MorphFC, then the FFN.

    ``xt = x + t_fc(t_norm1(x))`` is used only as the input of ``fc``; the residual stream
    continues from ``x`` (official "skip residual"). x: ``[B, T, H, W, C]``. ``frames``
    (keyword-only, extension) is passed to ``t_fc``.
    """

    def __init__(
        self,
        dim,
        segment_dim,
        mlp_ratio=4.0,
        qkv_bias=False,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        skip_lam=1.0,
        mlp_fn=MorphFC_S,
        *,
        frames=16,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.t_norm1 = norm_layer(dim)
        self.t_fc = MorphFC_T(
            dim, segment_dim=segment_dim, qkv_bias=qkv_bias, qk_scale=None, attn_drop=attn_drop, frames=frames
        )
        self.fc = mlp_fn(dim, segment_dim=segment_dim, qkv_bias=qkv_bias, qk_scale=None, attn_drop=attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, self.mlp.fc1.in_features, 5)
        xt = x + self.t_fc(self.t_norm1(x))
        x = x + self.drop_path(self.fc(self.norm1(xt))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
