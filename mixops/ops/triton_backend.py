"""The Triton backend: the one place where the kernels of ``mixops.kernels`` are registered as
the ``triton`` implementation of their ops (``mixops.backend.register``).

Nothing is registered where triton is not installed (it is a Linux-only dependency).
"""
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

from .. import backend

if triton is not None:
    from ..kernels import atm as _atm
    from ..kernels import atm_layer as _atm_layer
    from ..kernels import dynamixer as _dynamixer
    from ..kernels import morph_fc as _morph_fc
    from ..kernels import morph_fc_proj as _morph_fc_proj
    from ..kernels import repmlp as _repmlp
    from ..kernels import window_attention as _window_attention
    from ..kernels._common import on_input_device

    def register(op, name, *, forward, backward, auto):
        """Every Triton entry point runs under its inputs' CUDA device (on_input_device)."""
        backend.register(op, name, forward=on_input_device(forward), backward=on_input_device(backward), auto=auto)

    # auto=False: these kernels have passed the interpreter and compile for sm_90, but have not
    # run on a GPU yet; until they have, they run only when asked for by name.
    register("atm_sample", "triton", forward=_atm.forward, backward=_atm.backward, auto=False)
    register("atm_fc", "triton", forward=_atm.fc_forward, backward=_atm.fc_backward, auto=False)
    # the fused ATMLayer's internal ops (mixops.ops.atm_layer)
    register("_atm_means", "triton", forward=_atm_layer.means_forward, backward=_atm_layer.means_backward, auto=False)
    register("_atm_mix", "triton", forward=_atm_layer.mix_forward, backward=_atm_layer.mix_backward, auto=False)
    register("dynamixer_mix", "triton", forward=_dynamixer.forward, backward=_dynamixer.backward, auto=False)
    # the fused DynaMixerBlock's internal ops (mixops.ops.dynamixer)
    register("_dynamixer_axis_mix", "triton", forward=_dynamixer.axis_forward, backward=_dynamixer.axis_backward,
             auto=False)  # fmt: skip
    register("_dynamixer_reweighted", "triton", forward=_dynamixer.reweighted_forward,
             backward=_dynamixer.reweighted_backward, auto=False)  # fmt: skip
    register("morph_fc", "triton", forward=_morph_fc.forward, backward=_morph_fc.backward, auto=False)
    register(
        "_morph_branch", "triton", forward=_morph_fc.branch_forward, backward=_morph_fc.branch_backward, auto=False
    )
    register(
        "_reweighted_proj", "triton", forward=_morph_fc_proj.forward, backward=_morph_fc_proj.backward, auto=False
    )
    register("partition_fc", "triton", forward=_repmlp.forward, backward=_repmlp.backward, auto=False)
    register("window_attention", "triton", forward=_window_attention.forward, backward=_window_attention.backward,
             auto=False)  # fmt: skip
