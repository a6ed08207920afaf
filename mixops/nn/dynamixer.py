"""Drop-in DynaMixer modules: ``Mlp``, ``DynaMixerOp`` and ``DynaMixerBlock``.

Same class names, constructor arguments, child names and registration order as
``ziyuwwang/DynaMixer`` ``models/dynamixer.py`` and ``models/utils.py``, so an official
state_dict loads with ``strict=True``. The token mixing runs through ``mixops.dynamixer_mix``
(and therefore through the selected backend). Semantics: ``docs/dynamixer.md``.

Fused block path: when the backend ``mixops.dynamixer_mix`` resolves to for x also implements
the internal ops ``_dynamixer_axis_mix`` and ``_dynamixer_reweighted`` (torch, triton),
``DynaMixerBlock`` mixes the columns and rows of x where they lie (no transposed copies), takes
the reweighting's input from the token means of the two mixed maps and of x by the mean
identity, and runs ``mix_h.out``, ``mix_w.out``, ``mlp_c`` and the weighted sum as one K = 3C
GEMM: no branch output is stored (docs/dynamixer.md section 11). Otherwise the official
sequence through the public op.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import check_tensor
from ..backend import fused_backend
from ..ops.dynamixer import dynamixer_axis_mix, dynamixer_mix, dynamixer_reweighted
from ._layers import Mlp, reweighted_sum

__all__ = ["DynaMixerBlock", "DynaMixerOp", "Mlp"]

_FUSED_OPS = ("_dynamixer_axis_mix", "_dynamixer_reweighted")


class DynaMixerOp(nn.Module):
    """Dynamic mixing of the ``seq_len`` tokens of each sequence, then ``out``.

    Parameters (state_dict order): ``out`` Linear(dim, dim), ``compress`` Linear(dim,
    num_head*reduced_dim), ``generate`` Linear(seq_len*reduced_dim, seq_len**2). The
    parameter-free ``activation`` (Softmax over dim -2) is kept for structural parity with the
    official module; the softmax itself runs inside ``mixops.dynamixer_mix``.

    forward: x ``[B', seq_len, dim]`` -> ``[B', seq_len, dim]``.
    """

    def __init__(self, dim, seq_len, num_head, reduced_dim=2):
        super().__init__()
        self.dim = dim
        self.seq_len = seq_len
        self.num_head = num_head
        self.reduced_dim = reduced_dim
        self.out = nn.Linear(dim, dim)
        self.compress = nn.Linear(dim, num_head * reduced_dim)
        self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)
        self.activation = nn.Softmax(dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        if x.shape[1] != self.seq_len or x.shape[2] != self.dim:
            # generate is sized by seq_len: other sequence lengths cannot be mixed
            raise ValueError(
                f"x must have shape [B', {self.seq_len}, {self.dim}] (seq_len, dim), "
                f"got {tuple(x.shape)}"
            )
        y = dynamixer_mix(
            x,
            self.compress.weight,
            self.compress.bias,
            self.generate.weight,
            self.generate.bias,
            num_head=self.num_head,
            reduced_dim=self.reduced_dim,
        )
        return self.out(y)


class DynaMixerBlock(nn.Module):
    """H-mixing + W-mixing + channel FC, reweighted per channel (order h, w, c), then ``proj``.

    Children: ``mix_h`` (mixes along H: the sequences are columns), ``mix_w`` (along W: rows),
    ``mlp_c`` (Linear(dim, dim, bias=qkv_bias)), ``reweight`` (Mlp(dim, dim//4, 3*dim)),
    ``proj``, ``proj_drop``. ``qk_scale`` and ``attn_drop`` are accepted and unused, as in the
    official module.

    forward: channels-last x ``[B, H, W, dim]`` with H == W == resolution -> same shape.
    """

    def __init__(self, dim, resolution=32, num_head=8, reduced_dim=2, qkv_bias=False, qk_scale=None,
                 attn_drop=0., proj_drop=0.):
        super().__init__()
        self.resolution = resolution
        self.num_head = num_head
        self.mix_h = DynaMixerOp(dim, resolution, num_head, reduced_dim=reduced_dim)
        self.mix_w = DynaMixerOp(dim, resolution, num_head, reduced_dim=reduced_dim)
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        B, H, W, C = x.shape
        if H != self.resolution or W != self.resolution:
            # both mixers' generate Linears are sized by resolution
            raise ValueError(
                f"x must have H == W == resolution ({self.resolution}), got shape {tuple(x.shape)}"
            )
        backend = fused_backend("dynamixer_mix", _FUSED_OPS, x)
        if backend is not None:
            y = self._fused(x, backend)
        else:
            h = self.mix_h(x.permute(0, 2, 1, 3).reshape(B * W, H, C)).reshape(B, W, H, C).permute(0, 2, 1, 3)
            w = self.mix_w(x.reshape(B * H, W, C)).reshape(B, H, W, C)
            c = self.mlp_c(x)
            # branch order (h, w, c): reweight output 3c + k weighs branch k of channel c
            y = self.proj(reweighted_sum(self.reweight, [h, w, c]))
        return self.proj_drop(y)

    def _fused(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """Pass 1: the two mixed maps and the reweighting input from token means alone, since
        mean(out(y)) = out.weight . mean(y) + out.bias (accumulated in fp32, rounded to the
        block's dtype as the official mean is); pass 2: the reweighted branch sum as one GEMM,
        then proj."""
        ops = (self.mix_h, self.mix_w)
        mixed = [
            dynamixer_axis_mix(x, op.compress.weight, op.compress.bias, op.generate.weight, op.generate.bias,
                               num_head=op.num_head, reduced_dim=op.reduced_dim, axis=axis, backend=backend)
            for op, axis in zip(ops, ("h", "w"))
        ]  # fmt: skip
        weights = (self.mix_h.out.weight, self.mix_w.out.weight, self.mlp_c.weight)
        biases = (self.mix_h.out.bias, self.mix_w.out.bias, self.mlp_c.bias)
        acc = torch.promote_types(mixed[0].dtype, torch.float32)
        a = None
        for t, w, b in zip((*mixed, x), weights, biases):
            term = t.mean(dim=(1, 2), dtype=acc) @ w.to(acc).t()
            if b is not None:
                term = term + b.to(acc)
            a = term if a is None else a + term
        B, C = x.shape[0], x.shape[-1]
        alpha = self.reweight(a.to(mixed[0].dtype)).reshape(B, C, 3).to(acc).softmax(dim=2)
        return self.proj(dynamixer_reweighted(*mixed, x, weights, biases, alpha, backend=backend))
