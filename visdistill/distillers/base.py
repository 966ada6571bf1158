"""The contract every distillation method implements."""

from __future__ import annotations

from collections.abc import Sequence

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

    Args:
        weight: multiplier of this term in the total loss.
    """

    name: str = "term"
    student_stages: tuple[int, ...] = ()
    teacher_stages: tuple[int, ...] = ()
    needs_pooled: bool = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        """Build parameters that depend on the models (projectors, class means ...)."""

    def forward(
        self, student: ModelOutput, teachers: Sequence[ModelOutput], target: Tensor
    ) -> dict[str, Tensor]:
        raise NotImplementedError
