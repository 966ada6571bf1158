"""Lightning callbacks shipped with visdistill."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .checkpoints import atomic_write


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` results as CSV: ``index, pred, p_0 ... p_{K-1}`` per sample.

    Args:
        filename: written in the run's log directory (``trainer.log_dir``), or at this
            path when it is absolute.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            return
        if isinstance(predictions[0], list):  # several predict dataloaders
            predictions = [p for group in predictions for p in group]
        index = torch.cat([p["index"] for p in predictions]).tolist()
        pred = torch.cat([p["pred"] for p in predictions]).tolist()
        probs = torch.cat([p["probs"] for p in predictions]).tolist()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["index", "pred", *(f"p_{k}" for k in range(len(probs[0])))])
        for i, p, row in zip(index, pred, probs, strict=True):
            writer.writerow([i, p, *(f"{v:.6f}" for v in row)])
        base = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = base / self.filename
        text = buffer.getvalue()
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {len(index)} predictions to {self.path}")
