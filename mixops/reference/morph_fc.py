"""MorphMLP (MorphFC) reference: the official computation, restated step by step.

Restates ``MTLab/MorphMLP`` @ 62ebe80d7f76, ``slowfast/models/morphmlp.py``:

- ``Mlp`` (L19-35)                 -> :func:`mlp_forward`
- ``MorphFC_S2`` (L38-74)          -> :func:`morph_fc_s2_forward` (strided "hs" chunks)
- ``MorphFC_S`` (L76-115)          -> :func:`morph_fc_s_forward` ("h" and "w" chunks)
- ``MorphFC_T`` (L117-145; and ``morphmlp_32.py`` L115-145 for the 32-frame group rule)
                                   -> :func:`morph_fc_t_forward`
- ``PermutatorBlock`` (L146-168)   -> :func:`permutator_block_forward`

:func:`morph_fc` is one chunked token-FC branch, ``(x, weight, bias, segment_dim, axis)``,
written as the official reshape / permute / Linear / inverse-permute sequence of that branch.
It is the ``torch`` backend of ``mixops.morph_fc``. Layout is channels-last throughout:
``x`` is ``[B, T, H, W, C]`` (video) or ``[B, H, W, C]`` (image, handled as T = 1).

With ``L = segment_dim``, ``D = C // L``, ``N = H * W``:

- ``"w"``:  chunk k holds tokens ``n = k*L + p`` of the row-major sequence (``n = h*W + w``);
- ``"h"``:  the same on the column-major sequence (``m = w*H + h``);
- ``"hs"``: chunk k holds tokens ``n = p*(N/L) + k`` (stage-4 strided chunks);
- ``"t"``:  ``segment_dim`` is the channel-group count G, ``D_t = C // G``; for each
  (b, h, w, g) the whole clip ``v[t*D_t + s] = x[b, t, h, w, g*D_t + s]`` is one row.

In every spatial branch the FC row of chunk (b, t, k, g) is ``v[p*D + s] = x[.., tok(k, p),
g*D + s]`` (position-major, channel-minor) and the weight is ``[C, C]``; the bias is therefore
indexed by ``p*D + s`` (or ``t*D_t + s``), not by output channel.

Everything here is dtype-generic (float64 included), validates nothing and uses no custom op:
it is the oracle the ops and kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import branch_weights, drop_path, mlp_forward

__all__ = [
    "drop_path",
    "mlp_forward",
    "morph_branch",
    "morph_fc",
    "morph_fc_s2_forward",
    "morph_fc_s_forward",
    "morph_fc_t_forward",
    "permutator_block_forward",
    "reweighted_proj",
]


def _branch_w(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, L: int) -> torch.Tensor:
    # MorphFC_S "W" branch: (k, p) splits the row-major token axis, (g, s) the channels.
    B, T, H, W, C = x.shape
    S = C // L
    n = H * W // L
    rows = x.reshape(B, T, n, L, L, S).permute(0, 1, 2, 4, 3, 5).reshape(B, T, n, L, L * S)
    out = F.linear(rows, weight, bias)
    return out.reshape(B, T, n, L, L, S).permute(0, 1, 2, 4, 3, 5).reshape(B, T, H, W, C)


def _branch_h(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, L: int) -> torch.Tensor:
    # MorphFC_S "H" branch: the W branch on the spatially transposed tensor (column-major).
    B, T, H, W, C = x.shape
    S = C // L
    n = H * W // L
    rows = (
        x.transpose(3, 2)
        .reshape(B, T, n, L, L, S)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(B, T, n, L, L * S)
    )
    out = F.linear(rows, weight, bias)
    return out.reshape(B, T, n, L, L, S).permute(0, 1, 2, 4, 3, 5).reshape(B, T, W, H, C).transpose(3, 2)


def _branch_hs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, L: int) -> torch.Tensor:
    # MorphFC_S2 "H" branch: the token axis splits as (p, k), so chunk k is strided by N/L.
    B, T, H, W, C = x.shape
    S = C // L
    n = H * W // L
    rows = x.reshape(B, T, L, n, L, S).permute(0, 1, 4, 3, 2, 5).reshape(B, T, L, n, L * S)
    out = F.linear(rows, weight, bias)
    return out.reshape(B, T, L, n, L, S).permute(0, 1, 4, 3, 2, 5).reshape(B, T, H, W, C)


def _branch_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, G: int) -> torch.Tensor:
    # MorphFC_T: G channel groups; each (b, g, h, w) row is the whole clip, time-major.
    B, T, H, W, C = x.shape
    S = C // G
    rows = x.reshape(B, T, H, W, G, S).permute(0, 4, 2, 3, 1, 5).reshape(B, G, H, W, T * S)
    out = F.linear(rows, weight, bias)
    return out.reshape(B, G, H, W, T, S).permute(0, 4, 2, 3, 1, 5).reshape(B, T, H, W, C)


_BRANCHES = {"w": _branch_w, "h": _branch_h, "hs": _branch_hs, "t": _branch_t}


def morph_fc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    segment_dim: int,
    axis: str,
) -> torch.Tensor:
    """One chunked token-FC branch of MorphFC.

    x: ``[B, T, H, W, C]`` or ``[B, H, W, C]`` (T = 1), channels-last.
    weight: ``[C, C]`` for axis "w", "h", "hs"; ``[F, F]`` with ``F = T * C / segment_dim``
    for axis "t". bias: ``[C]`` / ``[F]`` or None, indexed by (position in row, channel in group).
    Returns a tensor of x's shape (a transposed view for the H branch, as the official).
    """
    x5 = x if x.dim() == 5 else x.unsqueeze(1)
    out = _BRANCHES[axis](x5, weight, bias, segment_dim)
    # The official H branch leaves a transposed view here; the custom op makes its output
    # contiguous (mixops.ops._define), the official-baseline module forwards keep the view.
    return out.reshape(x.shape)


def morph_branch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    segment_dim: int,
    axis: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MorphFC branch and its token mean (the internal op ``mixops::_morph_branch``).

    axis "w" / "h" / "hs" / "t" as :func:`morph_fc`; axis "c" is the channel FC ``mlp_c``
    (``segment_dim`` unused). Returns ``(y, mean)``: y of x's shape and dtype, mean ``[B, C]``
    over the T*H*W tokens of y, kept in fp32 (fp64 for fp64 inputs).
    """
    y = F.linear(x, weight, bias) if axis == "c" else morph_fc(x, weight, bias, segment_dim, axis)
    y5 = y if y.dim() == 5 else y.unsqueeze(1)
    acc = torch.promote_types(y.dtype, torch.float32)
    return y, y5.mean(dim=(1, 2, 3), dtype=acc)


def reweighted_proj(
    b0: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor | None,
    alpha: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``proj`` of the reweighted branch sum (the internal op ``mixops::_reweighted_proj``).

    b0, b1[, b2]: branches ``[B, ..., C]`` in the official add order ``((b0*a0 + b1*a1) +
    b2*a2)``; alpha ``[B, C, K]`` in at least fp32 (one weight per batch item, channel and
    branch). The sum is formed in alpha's precision and rounded to the branches' dtype before
    the ``[C, C]`` Linear, as a fused kernel rounds its GEMM operand.
    """
    branches = [b0, b1] if b2 is None else [b0, b1, b2]
    a = alpha.reshape(alpha.shape[0], *(1,) * (b0.dim() - 2), *alpha.shape[1:])
    y = b0 * a[..., 0]
    for k in range(1, len(branches)):
        y = y + branches[k] * a[..., k]
    return F.linear(y.to(b0.dtype), weight, bias)


def _clip_mean(y: torch.Tensor) -> torch.Tensor:
    # [B, T, H, W, C] -> [B, C]: the official permute + flatten + mean over T*H*W, accumulated
    # in at least fp32 and rounded back to y's dtype (what torch's mean does for half types).
    acc = torch.promote_types(y.dtype, torch.float32)
    return y.permute(0, 4, 1, 2, 3).flatten(2).mean(2, dtype=acc).to(y.dtype)


def _as_video(x: torch.Tensor) -> torch.Tensor:
    # Image input [B, H, W, C] is a clip of one frame; the official code is video-only.
    return x if x.dim() == 5 else x.unsqueeze(1)


def morph_fc_s_forward(m, x: torch.Tensor) -> torch.Tensor:
    """``MorphFC_S`` (stages 1-3). x: ``[B, T, H, W, C]`` or ``[B, H, W, C]``; same shape out."""
    v = _as_video(x)
    B, T, H, W, C = v.shape
    L = m.segment_dim
    h = morph_fc(v, m.mlp_h.weight, m.mlp_h.bias, L, "h")
    w = morph_fc(v, m.mlp_w.weight, m.mlp_w.bias, L, "w")
    c = F.linear(v, m.mlp_c.weight, m.mlp_c.bias)
    a = _clip_mean(h + w + c)
    # reweight output is interleaved (C, 3): channel c, branch k at index 3c + k
    a = branch_weights(m.reweight, a, 3)
    a = a.unsqueeze(2).unsqueeze(2).unsqueeze(2)
    y = h * a[0] + w * a[1] + c * a[2]
    y = F.linear(y, m.proj.weight, m.proj.bias)
    y = F.dropout(y, m.proj_drop.p, m.training)
    return y.reshape(x.shape)


def morph_fc_s2_forward(m, x: torch.Tensor) -> torch.Tensor:
    """``MorphFC_S2`` (stage 4). x: ``[B, T, H, W, C]`` or ``[B, H, W, C]``; same shape out."""
    v = _as_video(x)
    B, T, H, W, C = v.shape
    L = m.segment_dim
    h = morph_fc(v, m.mlp_h.weight, m.mlp_h.bias, L, "hs")
    c = F.linear(v, m.mlp_c.weight, m.mlp_c.bias)
    a = _clip_mean(h + c)
    # two-way interleaved reweight: channel c, branch k at index 2c + k
    a = branch_weights(m.reweight, a, 2)
    a = a.unsqueeze(2).unsqueeze(2).unsqueeze(2)
    y = h * a[0] + c * a[1]
    y = F.linear(y, m.proj.weight, m.proj.bias)
    y = F.dropout(y, m.proj_drop.p, m.training)
    return y.reshape(x.shape)


def morph_fc_t_forward(m, x: torch.Tensor) -> torch.Tensor:
    """``MorphFC_T``. x: ``[B, T, H, W, C]`` with ``T * C / m.segment_dim == mlp_t`` size."""
    t = morph_fc(x, m.mlp_t.weight, m.mlp_t.bias, m.segment_dim, "t")
    y = F.linear(t, m.proj.weight, m.proj.bias)
    return F.dropout(y, m.proj_drop.p, m.training)


def permutator_block_forward(m, x: torch.Tensor) -> torch.Tensor:
    """``PermutatorBlock``. x: ``[B, T, H, W, C]`` -> same shape.

    The temporal output ``xt`` feeds only the spatial MorphFC; the residual stream continues
    from ``x`` (official "skip residual"). ``m.fc`` is MorphFC_S when it has ``mlp_w``, else
    MorphFC_S2.
    """
    p = getattr(m.drop_path, "drop_prob", 0.0)
    spatial = morph_fc_s_forward if hasattr(m.fc, "mlp_w") else morph_fc_s2_forward
    xt = x + morph_fc_t_forward(m.t_fc, m.t_norm1(x))
    x = x + drop_path(spatial(m.fc, m.norm1(xt)), p, m.training) / m.skip_lam
    x = x + drop_path(mlp_forward(m.mlp, m.norm2(x)), p, m.training) / m.skip_lam
    return x
