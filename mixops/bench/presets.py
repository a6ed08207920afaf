"""Benchmark presets: the stage shapes of the model configs in docs/, per family.

A preset is a list of cases; a case builds, on a device and dtype, the official computation
(the reference, i.e. the official code's own sequence of ops), the mixops path (the drop-in
module or op, which runs on whatever backend is selected) and their inputs. FLOPs are the
forward GEMM/attention FLOPs of the layer (2 per multiply-add).

Batch sizes: the model's training batch per GPU (B = 128 unless the family's docs page says otherwise), a
prime batch where the official code degrades on one (ATM: torchvision chunks the batch by its
largest divisor <= 32), and B = 1 on CPUs, where the large batches would take minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import nn as mnn
from .. import reference as ref
from ..ops import atm_sample, morph_fc, window_attention


@dataclass
class Peer:
    """A plain torch op of the same size as the case (e.g. the matmul of the same M, N, K):
    the bar a target like "within 80% of a plain matmul" is measured against, in the same run."""

    name: str
    fn: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]


@dataclass
class Built:
    official: Callable[..., torch.Tensor]
    mixops: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]
    params: list[torch.Tensor]
    flops: float
    peer: Optional[Peer] = None


@dataclass
class Case:
    preset: str
    name: str
    batch: int
    ops: tuple[str, ...]
    build: Callable[[torch.device, torch.dtype], Built] = field(repr=False)


def _rand(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()


def _module(m: torch.nn.Module, device, dtype) -> torch.nn.Module:
    return m.to(device=device, dtype=dtype).eval()


# --- MorphMLP: MorphFC layers (docs/morph_fc.md 10.1) ------------------------------------

_MORPH = {
    "morphmlp-t": [(56, 84, 14), (28, 168, 28), (14, 336, 28), (7, 588, 49)],
    "morphmlp-s": [(56, 112, 14), (28, 224, 28), (14, 392, 28), (7, 784, 49)],
}


def _morph_case(preset, stage, hw, c, seg, batch):
    last = stage == 4

    def build(device, dtype):
        cls = mnn.MorphFC_S2 if last else mnn.MorphFC_S
        m = _module(cls(c, segment_dim=seg, qkv_bias=True), device, dtype)
        official = ref.morph_fc.morph_fc_s2_forward if last else ref.morph_fc.morph_fc_s_forward
        x = _rand(batch, hw, hw, c, device=device, dtype=dtype)
        gemms = 3 if last else 4  # branches + proj
        return Built(lambda x: official(m, x), m, [x], list(m.parameters()),
                     gemms * 2.0 * batch * hw * hw * c * c)

    return Case(preset, f"s{stage} {hw}x{hw} C{c} L{seg}", batch, ("morph_fc",), build)


def _morph_video_case(stage, hw, c, seg, batch, frames=8):
    """MorphMLP-S 16x224 video block mixers: MorphFC_S (S2 at stage 4) and MorphFC_T."""

    def build(device, dtype):
        s_cls = mnn.MorphFC_S2 if stage == 4 else mnn.MorphFC_S
        s = _module(s_cls(c, segment_dim=seg, qkv_bias=True), device, dtype)
        t = _module(mnn.MorphFC_T(c, qkv_bias=True), device, dtype)
        s_ref = ref.morph_fc.morph_fc_s2_forward if stage == 4 else ref.morph_fc.morph_fc_s_forward
        x = _rand(batch, frames, hw, hw, c, device=device, dtype=dtype)
        gemms = (3 if stage == 4 else 4) + 2
        return Built(lambda x: s_ref(s, x + ref.morph_fc.morph_fc_t_forward(t, x)),
                     lambda x: s(x + t(x)), [x], [*s.parameters(), *t.parameters()],
                     gemms * 2.0 * batch * frames * hw * hw * c * c)

    return Case("morphmlp-s-video16", f"s{stage} 8x{hw}x{hw} C{c}", batch, ("morph_fc",), build)


def _morph_branch_case(preset, stage, hw, c, seg, batch):
    """One chunked token-FC branch alone (H: the column-major gather; stage 4: strided "hs"),
    against a plain matmul of the same [M, C] x [C, C] (the DESIGN.md branch-GEMM target)."""
    axis = "hs" if stage == 4 else "h"

    def build(device, dtype):
        x = _rand(batch, hw, hw, c, device=device, dtype=dtype)
        w = _rand(c, c, device=device, dtype=dtype, scale=c**-0.5)
        b = _rand(c, device=device, dtype=dtype)
        rows = _rand(batch * hw * hw, c, device=device, dtype=dtype)
        return Built(lambda x, w, b: ref.morph_fc.morph_fc(x, w, b, seg, axis),
                     lambda x, w, b: morph_fc(x, w, b, segment_dim=seg, axis=axis),
                     [x, w, b], [], 2.0 * batch * hw * hw * c * c,
                     Peer("matmul", lambda a, w, b: torch.addmm(b, a, w.t()), [rows, w, b]))

    return Case(preset, f"s{stage} {axis} {hw}x{hw} C{c} L{seg}", batch, ("morph_fc",), build)


# --- ActiveMLP: ATMLayer (docs/atm.md 11.1) ------------------------------------------------

_ATM = {"activemlp-t": [(56, 64, 2), (28, 128, 4), (14, 320, 4), (7, 512, 8)]}


def _atm_case(preset, stage, hw, c, share, batch):
    def build(device, dtype):
        m = _module(mnn.ATMLayer(c), device, dtype)
        x = _rand(batch, hw, hw, c, device=device, dtype=dtype)
        # the official offset: offset_layer output [B,H,W,2C/S], repeat_interleave'd, permuted
        compact = _rand(batch, hw, hw, 2 * c // share, device=device, dtype=dtype, scale=2.0)
        official = ref.atm.atm_layer_forward

        def expand(o):
            return o.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)

        def fast(x, o):  # the compact offsets, as an offset-generating ActiveBlock passes them
            g = o.shape[-1] // 2
            return m.forward_compact(x, o[..., :g], o[..., g:], share=share)

        return Built(lambda x, o: official(m, x, expand(o)), fast,
                     [x, compact], list(m.parameters()), 4 * 2.0 * batch * hw * hw * c * c)

    return Case(preset, f"s{stage} {hw}x{hw} C{c} S{share}", batch, ("atm_fc", "atm_sample"), build)


def _atm_gather_case(preset, stage, hw, c, share, batch):
    """The bare gather (atm_sample, W axis) on the compact offsets: its GB/s against the copy
    ceiling is the DESIGN.md gather target. The official code has no bare gather; the baseline is
    the reference lerp."""

    def build(device, dtype):
        x = _rand(batch, hw, hw, c, device=device, dtype=dtype)
        off = _rand(batch, hw, hw, c // share, device=device, dtype=dtype, scale=2.0)
        return Built(lambda x, o: ref.atm.atm_sample(x, o, "w", share),
                     lambda x, o: atm_sample(x, o, axis="w", share=share), [x, off], [], 0.0)

    return Case(preset, f"s{stage} {hw}x{hw} C{c} S{share}", batch, ("atm_sample",), build)


# --- DynaMixer: DynaMixerBlock (docs/dynamixer.md 7.1) -------------------------------------

_DYNA = {"dynamixer-s": [(32, 192, 8, 2), (16, 384, 16, 2)]}


def _dyna_case(preset, stage, n, c, heads, d, batch):
    def build(device, dtype):
        m = _module(mnn.DynaMixerBlock(c, resolution=n, num_head=heads, reduced_dim=d), device, dtype)
        x = _rand(batch, n, n, c, device=device, dtype=dtype)
        seqs = batch * n  # per mixing op
        per_op = 2.0 * seqs * (n * c * heads * d + heads * n * d * n * n + n * n * c + n * c * c)
        return Built(lambda x: ref.dynamixer.dynamixer_block_forward(m, x), m, [x],
                     list(m.parameters()), 2 * per_op + 2 * 2.0 * batch * n * n * c * c)

    return Case(preset, f"s{stage} {n}x{n} C{c} S{heads} d{d}", batch, ("dynamixer_mix",), build)


# DynaMixerOp alone (the DESIGN.md target): DynaMixer-S stage 1 and stages 2-4, DynaMixer-M stage 1
_DYNA_OP = {"dynamixer-op": [("S s1", 32, 192, 8, 2), ("S s2-4", 16, 384, 16, 2), ("M s1", 32, 256, 8, 2)]}


def _dyna_op_case(preset, label, n, c, heads, d, batch):
    def build(device, dtype):
        m = _module(mnn.DynaMixerOp(c, n, heads, d), device, dtype)
        x = _rand(batch * n, n, c, device=device, dtype=dtype)  # the W mixing's sequences: B*H rows
        seqs = batch * n
        flops = 2.0 * seqs * (n * c * heads * d + heads * n * d * n * n + n * n * c + n * c * c)
        return Built(lambda x: ref.dynamixer.dynamixer_op_forward(m, x), m, [x], list(m.parameters()), flops)

    return Case(preset, f"{label} N{n} C{c} S{heads} d{d}", batch, ("dynamixer_mix",), build)


# --- UniFormer: window attention, stage 3 (docs/window_attention.md 2.10) ------------------

# (H, W, ws): detection size (800 x 1333 -> 50 x 84) and ADE20K size (512 -> 32 x 32) at ws 14 and
# 32; (T, H, W) of the global block at 224 px and of the 16-frame video stage
_WINDOWS = {"uniformer-s-win": [(50, 84, 14), (32, 32, 14), (32, 32, 32)]}
_GLOBAL = {"uniformer-s-global": [(1, 14, 14), (8, 14, 14)]}


def _window_case(preset, h, w, ws, batch, c=320, heads=5, t=1):
    def build(device, dtype):
        lead = (batch, h, w) if t == 1 else (batch, t, h, w)
        qkv = _rand(*lead, 3 * c, device=device, dtype=dtype)
        bias = _rand(3 * c, device=device, dtype=dtype)
        tokens = t * h * w
        # real queries only (padded ones are work a kernel can skip), each over ws*ws keys
        flops = 4.0 * batch * tokens * (ws * ws if ws else tokens) * c

        def official(qkv, bias):  # pad + partition + SDPA + reverse (DESIGN.md baseline)
            return ref.window_attention.window_attention_sdpa(qkv, heads, ws, (c // heads) ** -0.5, "bias", bias)

        def fast(qkv, bias):
            return window_attention(qkv, num_heads=heads, window_size=ws, qkv_bias=bias)

        return Built(official, fast, [qkv, bias], [], flops)

    where = f"{h}x{w} ws{ws}" if ws else (f"{h}x{w} global" if t == 1 else f"{t}x{h}x{w} global")
    return Case(preset, f"{where} C{c}", batch, ("window_attention",), build)


# --- RepMLPNet: deploy RepMLPBlock (docs/repmlp.md 8) --------------------------------------

_REPMLP = {
    "repmlp-t224": [(56, 64, 1), (28, 128, 4), (14, 256, 16), (7, 512, 128)],
    "repmlp-b224": [(56, 96, 1), (28, 192, 4), (14, 384, 32), (7, 768, 128)],
}


def _repmlp_case(preset, stage, hw, c, sets, batch):
    def build(device, dtype):
        m = _module(mnn.RepMLPBlock(c, c, hw, hw, num_sharesets=sets, deploy=True), device, dtype)
        x = _rand(batch, c, hw, hw, device=device, dtype=dtype)
        return Built(lambda x: ref.repmlp.repmlp_block_forward(m, x), m, [x], list(m.parameters()),
                     2.0 * batch * c * (hw * hw) ** 2)

    return Case(preset, f"s{stage} {hw}x{hw} C{c} S{sets}", batch, ("partition_fc",), build)


def presets(device: torch.device, batches: list[int] | None = None) -> dict[str, list[Case]]:
    """All presets; ``batches`` overrides every preset's batch sizes."""
    gpu = device.type == "cuda"

    def bs(*gpu_batches):
        return batches or (list(gpu_batches) if gpu else [1])

    out: dict[str, list[Case]] = {}
    for name, stages in _MORPH.items():
        out[name] = [_morph_case(name, i + 1, *s, b) for b in bs(128, 1) for i, s in enumerate(stages)]
        out[f"{name}-branch"] = [
            _morph_branch_case(f"{name}-branch", i + 1, *s, b) for b in bs(128, 1) for i, s in enumerate(stages)
        ]
    out["morphmlp-s-video16"] = [
        _morph_video_case(i + 1, *s, b) for b in bs(8) for i, s in enumerate(_MORPH["morphmlp-s"])
    ]
    for name, stages in _ATM.items():
        out[name] = [_atm_case(name, i + 1, *s, b) for b in bs(128, 127, 1) for i, s in enumerate(stages)]
        out[f"{name}-gather"] = [
            _atm_gather_case(f"{name}-gather", i + 1, *s, b) for b in bs(128, 127, 1) for i, s in enumerate(stages)
        ]
    for name, stages in _DYNA.items():
        out[name] = [_dyna_case(name, i + 1, *s, b) for b in bs(128, 1) for i, s in enumerate(stages)]
    for name, shapes in _DYNA_OP.items():
        out[name] = [_dyna_op_case(name, *s, b) for b in bs(128, 127, 1) for s in shapes]
    for name, shapes in _WINDOWS.items():
        out[name] = [_window_case(name, *s, b) for b in bs(8, 1) for s in shapes]
    for name, shapes in _GLOBAL.items():
        out[name] = [_window_case(name, h, w, None, b, t=t) for b in bs(8, 1) for t, h, w in shapes]
    for name, stages in _REPMLP.items():
        out[name] = [_repmlp_case(name, i + 1, *s, b) for b in bs(128, 1) for i, s in enumerate(stages)]
    out["headline"] = _headline(gpu, batches)
    return out


def _headline(gpu: bool, batches: list[int] | None) -> list[Case]:
    """The cases of the DESIGN.md targets that have kernels (what benchmarks/gpu_check.sh times),
    each under its own preset's name: on a GPU every stage at the training batch (DynaMixerOp:
    DynaMixer-S's two stage shapes; window attention: ws 14 at detection size, B = 8; the
    RepMLPNet-T224 deploy block's four stages), then the ATM layer at its prime batch (last: torchvision runs the official one image at a time, the
    slowest cases); on a CPU the last, smallest stage of each at B = 1, one quick case per target.
    ``batches`` replaces both batch sizes."""
    train = batches or ([128] if gpu else [1])
    prime = [] if batches or not gpu else [127]

    def cases(make, name, stages, sizes):
        chosen = list(enumerate(stages)) if gpu else [(len(stages) - 1, stages[-1])]
        return [make(name, i + 1, *s, b) for b in sizes for i, s in chosen]

    return [
        *cases(_morph_case, "morphmlp-s", _MORPH["morphmlp-s"], train),
        *cases(_atm_case, "activemlp-t", _ATM["activemlp-t"], train),
        *cases(_morph_branch_case, "morphmlp-s-branch", _MORPH["morphmlp-s"], train),
        *cases(_atm_gather_case, "activemlp-t-gather", _ATM["activemlp-t"], train),
        # DynaMixerOp at DynaMixer-S's two stage shapes (on a CPU the smaller, stages 2-4)
        *[_dyna_op_case("dynamixer-op", *s, b) for b in train for s in _DYNA_OP["dynamixer-op"][0 if gpu else 1 : 2]],
        # window attention at ws 14: detection size (on a CPU the ADE20K size)
        *[_window_case("uniformer-s-win", *_WINDOWS["uniformer-s-win"][0 if gpu else 1], b) for b in
          (batches or ([8] if gpu else [1]))],
        *cases(_repmlp_case, "repmlp-t224", _REPMLP["repmlp-t224"], train),
        *cases(_atm_case, "activemlp-t", _ATM["activemlp-t"], prime),
    ]


# The presets of the DESIGN.md target table: what `mixops-bench` runs with no arguments.
DEFAULT = [
    "morphmlp-s", "morphmlp-s-branch", "activemlp-t", "activemlp-t-gather", "dynamixer-s",
    "uniformer-s-win", "uniformer-s-global", "repmlp-t224", "repmlp-b224",
]
