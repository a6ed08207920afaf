"""The fused ATMLayer path (``docs/atm.md`` section 6) and its two internal ops.

``mixops::_atm_means(x, offset_w, offset_h, share) -> [B, 3, C]``: token means of the W- and
H-sampled features and of x (fp32; fp64 for fp64 inputs).
``mixops::_atm_mix(x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w, bias_h, alpha,
share) -> [B,H,W,C_out]``: ATMLayer's reweighted branch sum before ``proj``, one K = 3C GEMM
whose A operand is gathered in the load stage.

``atm_layer_mix`` strings them together with the tiny torch steps between them (branch means by
linearity, the fusion MLP, the softmax); ``fused_backend`` says whether the backend the public
``atm_fc`` would use has both internal ops (``torch``, ``triton``, ``cuda``), otherwise ATMLayer
keeps its unfused path (a backend that implements only atm_fc / atm_sample).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import backend as _backend
from ..reference import atm as _ref
from ._define import autocast_args, define_op
from .atm import _check_gather

__all__ = ["atm_layer_mix", "atm_means", "atm_mix", "fused_backend"]

_INTERNAL = ("_atm_means", "_atm_mix")


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _means_fake(x, offset_w, offset_h, share):
    return x.new_empty((x.shape[0], 3, x.shape[-1]), dtype=_accumulate_dtype(x))


def _mix_fake(x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w, bias_h, alpha, share):
    return x.new_empty((*x.shape[:-1], weight_w.shape[0]))


atm_means = define_op(
    "_atm_means",
    "(Tensor x, Tensor offset_w, Tensor offset_h, int share) -> Tensor",
    reference=_ref.atm_means,
    fake=_means_fake,
)

atm_mix = define_op(
    "_atm_mix",
    "(Tensor x, Tensor offset_w, Tensor offset_h, Tensor weight_w, Tensor weight_h, Tensor weight_c, "
    "Tensor? bias_w, Tensor? bias_h, Tensor alpha, int share) -> Tensor",
    reference=_ref.atm_mix,
    fake=_mix_fake,
)


def fused_backend(x: torch.Tensor) -> Optional[str]:
    """The backend ``atm_fc`` runs on for ``x`` when it also has both internal ops, else None."""
    return _backend.fused_backend("atm_fc", _INTERNAL, x)


def atm_layer_mix(
    x: torch.Tensor,
    offset_w: torch.Tensor,
    offset_h: torch.Tensor,
    share: int,
    weight_w: torch.Tensor,
    bias_w: Optional[torch.Tensor],
    weight_h: torch.Tensor,
    bias_h: Optional[torch.Tensor],
    weight_c: torch.Tensor,
    fusion: nn.Module,
    backend: str,
) -> torch.Tensor:
    """ATMLayer before ``proj``: ``x [B,H,W,C]``, compact offsets ``[B,H,W,C/share]``, branch
    weights ``[C, C]`` -> ``[B,H,W,C]``, through ``backend``'s internal ops.

    a = mean(w + h + c) = Ww·mean(sw) + bw + Wh·mean(sh) + bh + Wc·mean(x) (fp32), rounded to
    the layer's dtype as the official mean is; alpha = softmax_k fusion(a)[3c + k]; then the
    mix. Under autocast every operand is cast to fp32, as torchvision's deform_conv2d is in the
    official code (its channel branch then runs in fp32 too, not the autocast dtype).
    """
    x, offset_w, offset_h, weight_w, bias_w, weight_h, bias_h, weight_c = autocast_args(
        "fp32", x, offset_w, offset_h, weight_w, bias_w, weight_h, bias_h, weight_c
    )
    _check_gather(x, offset_w, "w", share)
    _check_gather(x, offset_h, "h", share)
    B, C = x.shape[0], x.shape[-1]
    means = atm_means(x, offset_w, offset_h, share, backend=backend)
    acc = means.dtype
    a = means[:, 0] @ weight_w.to(acc).t() + means[:, 1] @ weight_h.to(acc).t() + means[:, 2] @ weight_c.to(acc).t()
    for bias in (bias_w, bias_h):
        if bias is not None:
            a = a + bias.to(acc)
    alpha = fusion(a.to(x.dtype)).reshape(B, C, 3).softmax(dim=2)
    (alpha,) = autocast_args("fp32", alpha)
    return atm_mix(x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w, bias_h, alpha, share,
                   backend=backend)
