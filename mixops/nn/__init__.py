"""Drop-in modules: the official class names, constructor arguments, parameter names and
registration order, so official state_dicts load unchanged; the token mixing runs through the
``mixops`` ops and therefore through the selected backend."""
from . import video
from .atm import ATMLayer, ATMOp
from .dynamixer import DynaMixerBlock, DynaMixerOp
from .morph_fc import MorphFC_S, MorphFC_S2, MorphFC_T, PermutatorBlock
from .repmlp import RepMLPBlock
from .uniformer import Attention, SABlock, SABlock_Windows

__all__ = [
    "ATMLayer",
    "ATMOp",
    "Attention",
    "DynaMixerBlock",
    "DynaMixerOp",
    "MorphFC_S",
    "MorphFC_S2",
    "MorphFC_T",
    "PermutatorBlock",
    "RepMLPBlock",
    "SABlock",
    "SABlock_Windows",
    "video",
]
