"""Layers the official codebases share (all descend from ViP / timm): ``Mlp``, ``DropPath``
and the ViP reweighted sum of branches."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..reference._common import drop_path


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout on the last axis (children fc1, act, fc2, drop)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample; the identity in eval mode or with ``drop_prob == 0``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def reweighted_sum(reweight: Mlp, branches: list[torch.Tensor]) -> torch.Tensor:
    """ViP reweighting of K channels-last branches ``[B, ..., C]``: one softmax weight per
    sample, channel and branch from the interleaved reweight output (index ``K*c + k``),
    summed in branch order ``((b0*a0 + b1*a1) + b2*a2)`` as the official code adds them."""
    B, C = branches[0].shape[0], branches[0].shape[-1]
    K = len(branches)
    total = branches[0]
    for b in branches[1:]:
        total = total + b
    # token mean accumulated in fp32 (what torch's mean does for half types), then rounded back
    acc = torch.promote_types(total.dtype, torch.float32)
    a = total.mean(dim=tuple(range(1, total.dim() - 1)), dtype=acc).to(total.dtype)
    alpha = reweight(a).reshape(B, C, K).softmax(dim=2)
    alpha = alpha.reshape(B, *(1,) * (total.dim() - 2), C, K)
    y = branches[0] * alpha[..., 0]
    for k in range(1, K):
        y = y + branches[k] * alpha[..., k]
    return y
