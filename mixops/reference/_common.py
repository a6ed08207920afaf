"""Pieces the official codebases share (all descend from ViP / timm): the ``Mlp`` forward,
stochastic depth, and the ViP branch weights of the reweighting MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp_forward(m, x: torch.Tensor) -> torch.Tensor:
    """The official ``Mlp.forward``: fc1 -> act -> dropout -> fc2 -> dropout, ``[..., in] -> [..., out]``."""
    x = F.linear(x, m.fc1.weight, m.fc1.bias)
    x = m.act(x)
    x = F.dropout(x, m.drop.p, m.training)
    x = F.linear(x, m.fc2.weight, m.fc2.bias)
    return F.dropout(x, m.drop.p, m.training)


def layer_norm(m, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.LayerNorm`` module's forward, from its parameters and eps."""
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm ``DropPath``: survivors scaled by 1/keep)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


def branch_weights(reweight, a: torch.Tensor, branches: int) -> torch.Tensor:
    """ViP reweighting: ``a [B, C]`` (the token mean of the branch sum) -> ``[K, B, C]``.

    The MLP output is interleaved: channel c, branch k sits at index ``K*c + k``; the softmax
    runs over the K branches.
    """
    B, C = a.shape
    return mlp_forward(reweight, a).reshape(B, C, branches).permute(2, 0, 1).softmax(dim=0)
