"""Distillation terms: ``nn.Module``s, one per method, each a :class:`DistillTerm`."""

from .base import DistillTerm
from .diswot import DisWOT
from .dkd import DKD
from .kd import KD
from .meal_v2 import MEALV2, OutputDiscriminator
from .mst import FeatureGate, MSTRouting
from .nd import ND, EmbeddingProjector
from .ofa import OFA, CNNExit, TokenExit
from .trg import TRG
from .unic import UNIC, RunningStandardizer

__all__ = [
    "CNNExit",
    "DKD",
    "DisWOT",
    "DistillTerm",
    "EmbeddingProjector",
    "KD",
    "MEALV2",
    "MSTRouting",
    "ND",
    "OFA",
    "OutputDiscriminator",
    "RunningStandardizer",
    "TRG",
    "TokenExit",
    "UNIC",
    "FeatureGate",
]
