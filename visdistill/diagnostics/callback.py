"""Lightning callback: student-vs-teacher CKA on a fixed validation subset."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from .heatmap import cka_matrix, plot_cka


class CKACallback(L.Callback):
    """Every ``every_n_epochs``, linear CKA between student and one teacher's stages.

    Uses the first ``num_batches`` validation batches (a fixed subset, since the validation
    loader is not shuffled), under ``no_grad``, restoring the student's mode after. Logs
    ``cka/s<i>_t<j>`` numbers and, with a TensorBoard logger, the heat map image.

    Args:
        every_n_epochs: how often to compute.
        num_batches: validation batches used (each must hold more than 3 samples).
        student_stages / teacher_stages: stage indices; default all.
        teacher_index: which teacher of the ensemble.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_batches: int = 4,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        teacher_index: int = 0,
    ) -> None:
        self.every_n_epochs, self.num_batches = every_n_epochs, num_batches
        self.student_stages, self.teacher_stages = student_stages, teacher_stages
        self.teacher_index = teacher_index
        self.last_matrix: torch.Tensor | None = None

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if pl_module.teachers is None:
            return
        student, teacher = pl_module.student, pl_module.teachers[self.teacher_index]
        s_stages = list(self.student_stages or range(len(student.feature_info)))
        t_stages = list(self.teacher_stages or range(len(teacher.feature_info)))
        matrix, rows, cols = cka_matrix(
            student, teacher, trainer.val_dataloaders, s_stages, t_stages,
            progress=False, max_batches=self.num_batches,
        )  # fmt: skip
        self.last_matrix = matrix
        for i, s in enumerate(s_stages):
            for j, t in enumerate(t_stages):
                pl_module.log(f"cka/s{s}_t{t}", float(matrix[i, j]), sync_dist=False)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                fig = plot_cka(
                    matrix, rows, cols, f"{tmp}/cka.png", f"epoch {trainer.current_epoch}"
                )
            experiment.add_figure("cka/student_vs_teacher", fig, trainer.global_step)
