"""Hinton KD against the teachers' averaged soft target."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..losses.kd import kd_loss
from ..models import ModelOutput
from ..teachers import ensemble_probs
from .base import DistillTerm


class KD(DistillTerm):
    """Hinton knowledge distillation (2015) from one teacher or an ensemble.

    Target: the (per-sample weighted, else plain) mean over teachers of ``softmax(z_m / T)``; loss
    ``T^2 * KL(target || softmax(z_s / T))`` (:func:`~visdistill.losses.kd_loss`).

    Args:
        temperature: softening temperature ``T`` (4 is the common CIFAR choice).
        weight: multiplier in the total loss.
    """

    name = "kd"

    def __init__(self, temperature: float = 4.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        target_probs = ensemble_probs(teachers, self.temperature, teacher_weights)
        return {"kd": kd_loss(student.logits, target_probs, self.temperature)}
