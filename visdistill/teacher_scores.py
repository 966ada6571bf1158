"""The teachers' own accuracies, reported beside the student's (``val/<name>_acc``).

Frozen teachers do not change while the student trains, so validation measures them on its
first epoch only and repeats those numbers; test measures them again.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .models import ModelOutput
from .teachers import ENSEMBLE, TeacherEnsemble, ensemble_probs


class TeacherScores(nn.Module):
    """Top-1 accuracy of each classifier teacher and, when there are several, of their
    ensemble (the average of their probabilities).

    Args:
        teachers: the ensemble (``None``: no teachers, nothing to measure). Headless teachers
            have no accuracy and are left out.
    """

    def __init__(self, teachers: TeacherEnsemble | None) -> None:
        super().__init__()
        self.positions = teachers.classifiers if teachers is not None else []
        classes, n = (teachers.num_classes if teachers is not None else 0), len(self.positions)
        # Shared by validation (first epoch) and test.
        self.metrics = nn.ModuleList(
            MulticlassAccuracy(classes, average="micro") for _ in range(n + (n > 1))
        )
        # Validation's scores, measured once and logged again every epoch.
        self.val_scores: dict[str, float] | None = None

    @property
    def enabled(self) -> bool:
        """Whether some teacher has a classifier to score."""
        return bool(self.positions)

    def update(self, outputs: Sequence[ModelOutput], target: Tensor) -> None:
        """Add a batch: ``outputs`` of every teacher (the ensemble's order), ``target`` ``(B,)``."""
        outs = [outputs[i] for i in self.positions]  # the classifier teachers
        for metric, out in zip(self.metrics, outs, strict=False):
            metric.update(out.logits, target)
        if len(outs) > 1:
            self.metrics[-1].update(ensemble_probs(outs), target)

    def compute(self, names: Sequence[str]) -> dict[str, float]:
        """Accuracy per teacher name (``names``: every teacher's, the ensemble's order) and
        ``ensemble``; resets the metrics."""
        keys = [*(names[i] for i in self.positions), ENSEMBLE]
        scores = {}
        for key, metric in zip(keys, self.metrics, strict=False):
            scores[key] = float(metric.compute())
            metric.reset()
        return scores
