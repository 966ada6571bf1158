"""The contract every distillation method implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..models import Backbone, ModelOutput


class DistillTerm(nn.Module):
    """One distillation method, composable with others in a :class:`DistillationModule`.

    A term declares what it reads, so the module computes nothing else:

    - ``student_stages`` / ``teacher_stages``: stage indices (into ``feature_info``);
    - ``needs_pooled``: whether it reads ``(B, D)`` pre-logits features.

    ``setup(student, teachers)`` runs once when the module is built, before any
    forward pass: build projectors from ``feature_info`` there, so the optimizer sees
    them. ``forward`` returns named, *unweighted* losses; the module adds
    ``weight * sum(values)`` to the total and logs each under ``<name>/<key>``.

    Per-sample teacher weights (``shared/methods/multi-teacher.md`` §4) are how
    multi-teacher methods compose with any other term: a term that sets
    ``provides_teacher_weights = True`` returns a ``(B, M)`` matrix (rows sum to 1) from
    :meth:`teacher_weights`; the module computes it first and passes it to *every*
    term's ``forward`` as ``teacher_weights`` (``None`` means uniform). At most one term
    per module may provide weights.

    Training-time context a term may read: ``progress`` (fraction of the fit done, in
    ``[0, 1]``) and ``epoch`` (fractional epoch), refreshed before every training step;
    and :meth:`on_fit_start`, called once before the first epoch with the module, for
    work that needs data (e.g. teacher class means).

    Diagnostics that are not losses (routing frequencies, discriminator accuracy) go in
    ``last_metrics``: detached scalars that the module logs as ``train/<name>/<key>`` on the
    steps whose metrics reach the loggers, never added to the loss.

    Args:
        weight: multiplier of this term in the total loss.
    """

    name: str = "term"
    student_stages: tuple[int, ...] = ()
    teacher_stages: tuple[int, ...] = ()
    needs_pooled: bool = False
    provides_teacher_weights: bool = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.progress = 0.0
        self.epoch = 0.0
        self.last_metrics: dict[str, Tensor] = {}

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        """Build parameters that depend on the models (projectors, class means ...)."""

    def warmup_factor(self, warmup_epochs: float) -> float:
        """``min(1, epoch / warmup_epochs)`` (1 when ``warmup_epochs`` is 0)."""
        return 1.0 if warmup_epochs <= 0 else min(1.0, self.epoch / warmup_epochs)

    def on_fit_start(self, module: Any) -> None:
        """Called once by the :class:`DistillationModule` before training starts."""

    def teacher_weights(
        self, student: ModelOutput, teachers: Sequence[ModelOutput], target: Tensor
    ) -> Tensor | None:
        """``(B, M)`` per-sample teacher weights, for terms with ``provides_teacher_weights``."""
        return None

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


def uniform_or(teacher_weights: Tensor | None, batch: int, n_teachers: int, like: Tensor) -> Tensor:
    """``teacher_weights`` ``(B, M)``, or uniform ``1/M`` weights when it is ``None``."""
    if teacher_weights is None:
        return like.new_full((batch, n_teachers), 1.0 / n_teachers, dtype=torch.float32)
    if teacher_weights.shape != (batch, n_teachers):
        raise ValueError(
            f"teacher_weights must be (batch, teachers) = ({batch}, {n_teachers}), "
            f"got {tuple(teacher_weights.shape)}"
        )
    return teacher_weights.float()
