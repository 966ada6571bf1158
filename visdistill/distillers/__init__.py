"""Distillation terms: ``nn.Module``s, one per method, each a :class:`DistillTerm`."""

from .base import DistillTerm
from .dkd import DKD
from .kd import KD
from .nd import ND, EmbeddingProjector
from .ofa import OFA, CNNExit, TokenExit
from .trg import TRG

__all__ = [
    "CNNExit",
    "DKD",
    "DistillTerm",
    "EmbeddingProjector",
    "KD",
    "ND",
    "OFA",
    "TRG",
    "TokenExit",
]
