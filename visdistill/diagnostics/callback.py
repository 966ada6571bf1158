"""Lightning callback: student-vs-teacher CKA on a fixed validation subset."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .accumulator import NoCKABatchesError
from .heatmap import cka_matrix, plot_cka


class CKACallback(L.Callback):
    """Every ``every_n_epochs``, linear CKA between student and one teacher's stages.

    Uses a fixed random subset of the validation set: ``num_samples`` examples drawn once
    with ``seed`` (not the first batches, which on class-sorted image folders would all be
    one class), the same samples every time. Runs under ``no_grad``, restoring the
    student's mode after. Logs ``cka/s<i>_t<j>`` numbers and, with a TensorBoard logger,
    the heat map image. Under DDP each rank takes whole batches of the subset and the HSIC
    sums are all-reduced: the same value as one process.

    Args:
        every_n_epochs: how often to compute.
        num_samples: validation examples used (fewer if the validation set is smaller).
        batch_size: examples per CKA batch (>= 4; the HSIC_1 estimator needs 4).
        seed: draws the subset.
        student_stages / teacher_stages: stage indices; default all.
        teacher_index: which teacher of the ensemble.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 512,
        batch_size: int = 128,
        seed: int = 0,
        student_stages: Sequence[int] | None = None,
        teacher_stages: Sequence[int] | None = None,
        teacher_index: int = 0,
    ) -> None:
        if batch_size < 4:
            raise ConfigError(f"CKACallback batch_size must be >= 4 (HSIC_1), got {batch_size}")
        self.every_n_epochs, self.num_samples, self.batch_size = (
            every_n_epochs,
            num_samples,
            batch_size,
        )
        self.seed = seed
        self.student_stages, self.teacher_stages = student_stages, teacher_stages
        self.teacher_index = teacher_index
        self.last_matrix: torch.Tensor | None = None
        self._warned = False

    def subset_loader(self, trainer: L.Trainer) -> DataLoader:
        """The fixed validation subset this callback measures on (this rank's share).

        ``num_samples`` indices drawn with ``seed`` from the validation set, kept in their
        random order, so every batch mixes classes (sorted indices would give class-sorted
        batches on image folders, and per-batch HSIC_1 would then measure within-class
        similarity). A short tail of 1-3 examples is dropped: HSIC_1 needs 4 per batch.
        Under DDP rank ``r`` of ``w`` takes whole batches ``r, r + w, ...`` of that same
        batching, so the all-reduced HSIC sums are those of one process (batch composition
        matters to the minibatch estimator).
        """
        dm = getattr(trainer, "datamodule", None)
        source = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
        if isinstance(source, (list, tuple)):
            source = source[0]
        dataset = source.dataset
        g = torch.Generator().manual_seed(self.seed)
        picked = torch.randperm(len(dataset), generator=g)[: self.num_samples].tolist()
        if len(picked) % self.batch_size < 4:
            picked = picked[: len(picked) - len(picked) % self.batch_size]
        batches = [picked[i : i + self.batch_size] for i in range(0, len(picked), self.batch_size)]
        return DataLoader(
            dataset,
            batch_sampler=batches[trainer.global_rank :: trainer.world_size],
            collate_fn=source.collate_fn,
            num_workers=source.num_workers,
        )

    def _has_teacher(self, pl_module: L.LightningModule) -> bool:
        if getattr(pl_module, "teachers", None):
            return True
        if not self._warned:
            rank_zero_warn(
                "CKACallback needs a teacher to compare the student with, but the module has "
                "none; the callback is disabled"
            )
            self._warned = True
        return False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._has_teacher(pl_module)  # warn at the start, not after the first epoch

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not self._has_teacher(pl_module):
            return
        student, teacher = pl_module.student, pl_module.teachers[self.teacher_index]
        s_stages = list(self.student_stages or range(len(student.feature_info)))
        t_stages = list(self.teacher_stages or range(len(teacher.feature_info)))
        try:
            matrix, rows, cols = cka_matrix(
                student, teacher, self.subset_loader(trainer), s_stages, t_stages, progress=False
            )
        except NoCKABatchesError as e:  # no usable batch on any rank: raised on every rank
            rank_zero_warn(f"CKACallback skipped epoch {trainer.current_epoch}: {e}")
            return
        self.last_matrix = matrix
        for i, s in enumerate(s_stages):
            for j, t in enumerate(t_stages):
                # Identical on every rank (the sums were all-reduced), so the mean that
                # sync_dist takes changes nothing; it keeps callback_metrics the same on
                # every rank and silences Lightning's epoch-level "use sync_dist" warning.
                pl_module.log(f"cka/s{s}_t{t}", float(matrix[i, j]), sync_dist=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                fig = plot_cka(
                    matrix, rows, cols, f"{tmp}/cka.png", f"epoch {trainer.current_epoch}"
                )
            experiment.add_figure("cka/student_vs_teacher", fig, trainer.global_step)
