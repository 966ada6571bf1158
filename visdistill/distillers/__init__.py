"""Distillation terms: ``nn.Module``s, one per method, each a :class:`DistillTerm`."""

from .base import DistillTerm
from .kd import KD

__all__ = ["KD", "DistillTerm"]
