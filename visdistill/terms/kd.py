"""Hinton KD against the teachers' averaged soft target."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import ConfigError
from ..losses.kd import kd_loss
from ..models import ModelOutput
from ..teachers import ensemble_probs
from .base import DistillTerm


class KD(DistillTerm):
    """Hinton knowledge distillation (2015) from one teacher or an ensemble.

    Target: the (per-sample weighted, else plain) mean over teachers of ``softmax(z_m / T)``; loss
    ``T^2 * KL(target || softmax(z_s / T))`` (:func:`~visdistill.losses.kd_loss`). Zero case: 0
    when the student's logits equal every teacher's.

    Args:
        temperature: softening temperature ``T`` (4 is the common CIFAR choice).
        warmup_epochs: ramp the term linearly from 0 over this many epochs (the ND
            paper's KD++ warms the base KD term up; 0 disables).
        weight: multiplier in the total loss.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "kd"
    needs_logits = True
    zero_parts = ("kd",)

    def __init__(
        self,
        temperature: float = 4.0,
        warmup_epochs: float = 0.0,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if temperature <= 0:
            raise ConfigError(f"KD temperature must be > 0, got {temperature}")
        self.temperature, self.warmup_epochs = float(temperature), float(warmup_epochs)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        target_probs = ensemble_probs(teachers, self.temperature, teacher_weights)
        loss = kd_loss(student.logits, target_probs, self.temperature)
        return {"kd": self.warmup_factor(self.warmup_epochs) * loss}
