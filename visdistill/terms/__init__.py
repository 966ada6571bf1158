"""Distillation terms: each published method is one :class:`DistillTerm` (an ``nn.Module``)
that a :class:`~visdistill.DistillationModule` adds to the student's loss."""

from .adaptor import AdaptorHeads
from .base import DistillTerm, TermOutput, list_terms, term_from_config
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
    "AdaptorHeads",
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
    "TermOutput",
    "TokenExit",
    "UNIC",
    "FeatureGate",
    "list_terms",
    "term_from_config",
]
