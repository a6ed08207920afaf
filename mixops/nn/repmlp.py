"""Drop-in ``GlobalPerceptron`` and ``RepMLPBlock`` of RepMLPNet (``DingXiaoH/RepMLP``,
``repmlpnet.py``): same constructor arguments, children and registration order, so official
state_dicts (train-mode and deploy-mode) load with ``strict=True``.

The token mixing (fc3, the set-sharing partition FC) runs through ``mixops.partition_fc`` and
the locality injection through ``mixops.locality_injection``, so the selected backend applies.
In deploy form (and after ``local_inject()``) nothing stands between fc3 and the
global-perceptron gate, so the gate goes into ``partition_fc`` as its epilogue: on the Triton
backend one kernel reads x and writes the gated output.

Train mode: ``mixops.partition_fc`` (no bias) gives fc3's output already un-partitioned. That
un-partition is a permutation that keeps every element in its share-set (output channel
``c_o`` has ``c_o % S == s``, also in the scrambled case, docs/repmlp.md section 3.2), so ``fc3_bn`` applied to
the ``[N, S, C/S, H*W]`` share-set view sees exactly the values the official
``BatchNorm2d(S)`` on ``[rows, S, h, w]`` sees: same batch statistics, same running-statistics
update. The local-perceptron convs need the partition maps themselves (zero padding at the
partition border), so they use the official partition / un-partition reshapes (views, no copy,
at native resolution).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as v
from ..ops.repmlp import locality_injection, partition_fc
from ..reference.repmlp import fuse_bn

__all__ = ["GlobalPerceptron", "RepMLPBlock"]


def _conv_bn(channels: int, kernel_size: int, groups: int) -> nn.Sequential:
    """The official ``conv_bn``: children ``conv`` (no bias) and ``bn``."""
    result = nn.Sequential()
    result.add_module(
        "conv",
        nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=groups, bias=False),
    )
    result.add_module("bn", nn.BatchNorm2d(channels))
    return result


class GlobalPerceptron(nn.Module):
    """``sigmoid(fc2(relu(fc1(avgpool(x)))))``: a channel gate ``[N, C, 1, 1]`` of ``x [N, C, H, W]``."""

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, stride=1, bias=True)
        self.fc2 = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, stride=1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(inputs, output_size=(1, 1))
        x = F.relu(self.fc1(x), inplace=True)
        x = torch.sigmoid(self.fc2(x))
        return x.view(-1, self.input_channels, 1, 1)


class RepMLPBlock(nn.Module):
    """RepMLPNet's token mixer on ``[N, C, H, W]`` (``H % h == 0``, ``W % w == 0``).

    Children, in order: ``gp`` (GlobalPerceptron), ``fc3`` (``Conv2d(S*hw, S*hw, 1,
    groups=S)``, biased only in deploy mode), ``fc3_bn`` (``BatchNorm2d(S)``; Identity in deploy
    mode), then ``repconv{k}`` (``.conv``, ``.bn``) for each k of ``reparam_conv_k`` in train mode.
    ``local_inject()`` converts a train-mode block to deploy mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        h: int,
        w: int,
        reparam_conv_k: Optional[Sequence[int]] = None,
        globalperceptron_reduce: int = 4,
        num_sharesets: int = 1,
        deploy: bool = False,
    ):
        super().__init__()
        if out_channels != in_channels:
            raise ValueError(
                f"out_channels ({out_channels}) must equal in_channels ({in_channels})"
            )
        v.check_int("num_sharesets", num_sharesets)
        v.check_divisible("in_channels", in_channels, "num_sharesets", num_sharesets)
        v.check_int("h", h)
        v.check_int("w", w)
        if reparam_conv_k is not None and (
            len(set(reparam_conv_k)) != len(reparam_conv_k)
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0
                   for k in reparam_conv_k)
        ):
            # an even k would not keep the h x w size; a repeated k names one child twice
            raise ValueError(
                f"reparam_conv_k must hold distinct positive odd ints, got {tuple(reparam_conv_k)}"
            )
        self.C = in_channels
        self.O = out_channels
        self.S = num_sharesets
        self.h, self.w = h, w
        self.deploy = deploy

        self.gp = GlobalPerceptron(in_channels, in_channels // globalperceptron_reduce)
        hws = h * w * num_sharesets
        self.fc3 = nn.Conv2d(hws, hws, 1, 1, 0, bias=deploy, groups=num_sharesets)
        self.fc3_bn = nn.Identity() if deploy else nn.BatchNorm2d(num_sharesets)

        self.reparam_conv_k = reparam_conv_k
        if not deploy and reparam_conv_k is not None:
            for k in reparam_conv_k:
                setattr(self, f"repconv{k}", _conv_bn(num_sharesets, k, num_sharesets))

    def _check_inputs(self, inputs: torch.Tensor) -> None:
        v.check_tensor("inputs", inputs, ndim=4)
        if inputs.shape[1] != self.C:
            raise ValueError(
                f"inputs must have {self.C} channels, got shape {tuple(inputs.shape)}"
            )
        v.check_divisible("inputs height (H)", inputs.shape[2], "h", self.h)
        v.check_divisible("inputs width (W)", inputs.shape[3], "w", self.w)

    def _shareset_norm(self, y: torch.Tensor, bn: nn.Module) -> torch.Tensor:
        """``bn`` (``BatchNorm2d(S)``) on channel ``c % S`` of ``y [N, C, H, W]``."""
        N, C, H, W = y.shape
        z = bn(y.reshape(N, C // self.S, self.S, H * W).transpose(1, 2))
        return z.transpose(1, 2).reshape(N, C, H, W)

    def _local_perceptron(self, inputs: torch.Tensor) -> torch.Tensor:
        """Sum of the ``repconv{k}`` branches on the partition maps, un-partitioned."""
        shape = inputs.shape
        S, h, w = self.S, self.h, self.w
        hp, wp = shape[2] // h, shape[3] // w
        partitions = inputs.reshape(-1, self.C, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)
        conv_inputs = partitions.reshape(-1, S, h, w)
        conv_out = 0
        for k in self.reparam_conv_k:
            conv_out = conv_out + getattr(self, f"repconv{k}")(conv_inputs)
        conv_out = conv_out.reshape(-1, hp, wp, S, h, w).permute(0, 3, 1, 4, 2, 5)
        return conv_out.reshape(shape)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, C, H, W]``."""
        self._check_inputs(inputs)
        global_vec = self.gp(inputs)
        deploy = isinstance(self.fc3_bn, nn.Identity) and (self.reparam_conv_k is None or self.deploy)
        out = partition_fc(
            inputs,
            self.fc3.weight,
            self.fc3.bias,
            partition=(self.h, self.w),
            num_sharesets=self.S,
            # nothing between fc3 and the gate in deploy form: the gate is the FC's epilogue
            gate=global_vec if deploy else None,
        )
        if deploy:
            return out
        if not isinstance(self.fc3_bn, nn.Identity):
            out = self._shareset_norm(out, self.fc3_bn)
        if self.reparam_conv_k is not None and not self.deploy:
            out = out + self._local_perceptron(inputs)
        return out * global_vec

    def get_equivalent_fc3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deploy fc3 ``(weight [S*hw, hw, 1, 1], bias [S*hw])`` of a train-mode block:
        fc3 + fc3_bn plus every BN-fused ``repconv{k}``, zero-padded to the largest k, summed
        and folded in by ``mixops.locality_injection``. Uses the BN running statistics."""
        fc_weight, fc_bias = fuse_bn(self.fc3.weight, self.fc3_bn)
        if self.reparam_conv_k is None:
            return fc_weight, fc_bias
        largest_k = max(self.reparam_conv_k)
        kernel = 0
        bias = 0
        for k in self.reparam_conv_k:
            branch = getattr(self, f"repconv{k}")
            k_kernel, k_bias = fuse_bn(branch.conv.weight, branch.bn)
            kernel = kernel + F.pad(k_kernel, [(largest_k - k) // 2] * 4)
            bias = bias + k_bias
        return locality_injection(
            fc_weight, fc_bias, kernel, bias, partition=(self.h, self.w)
        )

    def local_inject(self) -> None:
        """Switch to deploy mode: fc3 becomes the biased equivalent FC, fc3_bn an Identity,
        the ``repconv{k}`` branches are removed (docs/repmlp.md section 4.4). The block then has the children and
        state_dict keys of ``RepMLPBlock(..., deploy=True)``."""
        if self.deploy:
            raise RuntimeError(
                "RepMLPBlock.local_inject() needs a train-mode block; this one is already in "
                "deploy mode (local_inject was called before, or it was built with deploy=True)"
            )
        with torch.no_grad():
            weight, bias = self.get_equivalent_fc3()
        self.deploy = True
        if self.reparam_conv_k is not None:
            for k in self.reparam_conv_k:
                delattr(self, f"repconv{k}")
        del self.fc3
        del self.fc3_bn
        hws = self.S * self.h * self.w
        self.fc3 = nn.Conv2d(
            hws, hws, 1, 1, 0, bias=True, groups=self.S, device=weight.device, dtype=weight.dtype
        )
        self.fc3_bn = nn.Identity()
        with torch.no_grad():
            self.fc3.weight.copy_(weight)
            self.fc3.bias.copy_(bias)
