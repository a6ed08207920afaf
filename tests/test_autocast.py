"""Under torch.autocast the drop-in modules compute what the official code computes under the
same autocast (the references run the official sequence of ops, which autocast natively):
the custom ops are cast like the official Linear/conv (to the autocast dtype) or like
torchvision's deform_conv2d (to fp32)."""
import pytest
import torch

import mixops
from mixops import reference as ref
from mixops.nn.atm import ActiveBlock
from mixops_testing import assert_close

AMP = torch.bfloat16


def _cases():
    return {
        "MorphFC_S": (mixops.nn.MorphFC_S(28, 14, qkv_bias=True), ref.morph_fc.morph_fc_s_forward,
                      lambda: (torch.randn(2, 7, 6, 28),)),
        "ATMLayer": (mixops.nn.ATMLayer(16), ref.atm.atm_layer_forward,
                     lambda: (torch.randn(2, 5, 6, 16), torch.randn(2, 32, 5, 6) * 2)),
        "DynaMixerBlock": (mixops.nn.DynaMixerBlock(32, resolution=6, num_head=4), ref.dynamixer.dynamixer_block_forward,
                           lambda: (torch.randn(2, 6, 6, 32),)),
        "SABlock_Windows": (mixops.nn.SABlock_Windows(32, 2, window_size=4, qkv_bias=True),
                            ref.window_attention.sablock_windows_forward, lambda: (torch.randn(2, 32, 6, 7),)),
        "RepMLPBlock": (mixops.nn.RepMLPBlock(16, 16, 4, 4, num_sharesets=4, deploy=True),
                        ref.repmlp.repmlp_block_forward, lambda: (torch.randn(2, 16, 4, 4),)),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_module_under_autocast_matches_official_under_autocast(name):
    module, official, inputs = _cases()[name]
    module.eval()
    args = inputs()
    with torch.autocast("cpu", dtype=AMP):
        got = module(*args)
        want = official(module, *args)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert_close(got, want, dtype=AMP)


def test_active_block_generating_offsets_under_autocast():
    """norm1 gives fp32, offset_layer gives bf16: the official `offset_t += offset` promotes;
    the ATM ops are cast to fp32 like torchvision's deform_conv2d."""
    blk = ActiveBlock(16, share_dim=2, new_offset=True).eval()
    x = torch.randn(2, 5, 6, 16)
    with torch.autocast("cpu", dtype=AMP):
        y, offset = blk(x)
        want = ref.atm.active_block_forward(blk, x)
    want_y, want_offset = want if isinstance(want, tuple) else (want, None)
    assert_close(y, want_y, dtype=AMP)
