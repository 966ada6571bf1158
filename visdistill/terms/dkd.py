"""Decoupled KD term (Zhao et al., CVPR 2022)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import ConfigError
from ..losses.dkd import dkd_loss
from ..models import ModelOutput
from ..teachers import ensemble_log_probs
from .base import DistillTerm


class DKD(DistillTerm):
    """Decoupled KD against the teachers' (weighted) mean soft target.

    ``warmup_factor * (alpha * TCKD + beta * NCKD)`` (:func:`~visdistill.losses.dkd_loss`),
    the logit baseline ND and OFA are measured against. Zero case: 0 when the student's
    logits equal every teacher's (both parts are KL divergences).

    Args:
        alpha, beta: TCKD and NCKD weights (mdistiller CIFAR: 1 and 8; ImageNet: 0.5 and 0.5).
        temperature: ``T`` (mdistiller: 4 on CIFAR, 1 on ImageNet).
        warmup_epochs: linear ramp of the term (mdistiller: 20 of 240 epochs).
        weight: multiplier in the total loss.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "dkd"
    needs_logits = True
    needs_labels = True
    zero_parts = ("dkd",)

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 0.0,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if temperature <= 0:
            raise ConfigError(f"DKD temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.warmup_epochs = float(warmup_epochs)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        # Log space end to end: exact for teachers far more confident than float32 holds.
        log_probs = ensemble_log_probs(teachers, self.temperature, teacher_weights)
        loss = dkd_loss(
            student.logits,
            log_probs,
            target,
            self.alpha,
            self.beta,
            self.temperature,
            log_target=True,
        )
        return {"dkd": self.warmup_factor(self.warmup_epochs) * loss}
