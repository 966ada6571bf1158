"""Progress for batch-job logs: plain lines instead of a live bar.

Lightning's rich bar redraws one terminal line; written to a file it shows only its final
state, so a job log stays silent for a whole fit. :class:`LogLineProgressBar` is a Lightning
``ProgressBar`` that prints one line per epoch (after validation) and, inside long epochs,
one every ``every_n_steps`` batches or ``every_minutes`` minutes::

    epoch 3/8 | batch 156/156 | 301 img/s | loss 1.052 (ce 0.611, kd 0.441) | train/acc 71.20 % | val/acc 76.35 % | 3m35s, ETA 5m44s

:func:`make_progress_bar` picks it when stdout is not a terminal and the rich bar otherwise.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from .errors import ConfigError
from .formatting import format_duration, format_metric, is_accuracy
from .lightning_private import RICH_AVAILABLE as _RICH_AVAILABLE

ProgressMode = Literal["auto", "bar", "lines"]


class LogLineProgressBar(ProgressBar):
    """One plain line per epoch, and every ``every_n_steps`` batches or ``every_minutes``
    minutes within an epoch (whichever comes first), on rank zero.

    Each line has the epoch and batch, training images/s, the loss and its components
    (means over the batches since the previous line), ``train/acc`` and ``val/acc`` when
    known, the elapsed time and an ETA for the fit. Evaluation (``validate``, ``test``,
    ``predict``) gets one line when it ends.

    Args:
        every_n_steps: also print every N training batches; ``None``: only by time.
        every_minutes: also print when this many minutes passed since the last line;
            ``None`` or ``0``: only by step count.
        stream: where lines go (default ``sys.stdout``).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_minutes: float | None = 2.0,
        stream: Any = None,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"progress every_n_steps must be >= 1 or null, got {every_n_steps}")
        if every_minutes is not None and every_minutes < 0:
            raise ConfigError(f"progress every_minutes must be >= 0 or null, got {every_minutes}")
        self.every_n_steps = every_n_steps
        self.every_seconds = 60.0 * every_minutes if every_minutes else None
        self.stream = stream
        self._enabled = True
        self._reset_window()
        self._fit_start = self._eval_start = None
        self._batches_at_start = 0

    # ------------------------------------------------------------------ ProgressBar API
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, file=self.stream or sys.stdout, flush=True)

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.monotonic()
        self._batches_at_start = self._batches_done(trainer, -1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_window()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._enabled:
            return
        self._images += batch_size_of(batch)
        self._batches += 1
        self._batch_time = time.monotonic()
        if isinstance(outputs, dict) and "loss" in outputs:
            # Sums stay on the device: no host sync until a line is printed.
            self._add("loss", outputs["loss"])
            for key, value in (outputs.get("parts") or {}).items():
                self._add(key, value)
        last = batch_idx + 1 >= self.total_train_batches
        now = time.monotonic()
        due = (self.every_n_steps and (batch_idx + 1) % self.every_n_steps == 0) or (
            self.every_seconds and now - self._line_time >= self.every_seconds
        )
        if due and not last:  # the epoch's last batch is reported after validation
            self.print(self._line(trainer, batch_idx, epoch_end=False))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            self.print(self._line(trainer, self._last_batch_idx(trainer), epoch_end=True))

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start = time.monotonic()

    on_test_start = on_predict_start = on_validation_start

    def on_validation_end(self, trainer, pl_module) -> None:
        # Inside fit, validation is part of the epoch line.
        if self._enabled and not trainer.sanity_checking and trainer.state.fn != "fit":
            self._eval_line("validate", self.total_val_batches)

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self._eval_line("test", sum(trainer.num_test_batches))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self._eval_line("predict", sum(trainer.num_predict_batches))

    def _eval_line(self, what: str, batches: float) -> None:
        took = time.monotonic() - (self._eval_start or time.monotonic())
        count = int(batches) if math.isfinite(batches) else "?"
        self.print(f"{what}: {count} batches in {format_duration(took)}")

    # ------------------------------------------------------------------ the line
    def _reset_window(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._images = self._batches = 0
        self._line_time = self._batch_time = time.monotonic()

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        if key in self._sums:
            self._sums[key] = self._sums[key] + value
        else:
            self._sums[key] = value
        self._counts[key] = self._counts.get(key, 0) + 1

    def _line(self, trainer: L.Trainer, batch_idx: int, epoch_end: bool) -> str:
        now = time.monotonic()
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        total = self.total_train_batches
        parts = [
            f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else ""),
            f"batch {batch_idx + 1}" + (f"/{int(total)}" if math.isfinite(total) else ""),
        ]
        # Training images over training time: the epoch's line is printed after validation.
        window = self._batch_time - self._line_time
        if self._images and window > 0:
            parts.append(f"{self._images / window:.0f} img/s")
        means = {k: float(v) / self._counts[k] for k, v in self._sums.items()}
        if "loss" in means:
            loss = means.pop("loss")
            detail = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
            parts.append(f"loss {loss:.4g}" + (f" ({detail})" if detail else ""))
        metrics = trainer.callback_metrics
        # Without accuracy (headless student, no labels) val/loss is what selects checkpoints.
        val = "val/acc" if "val/acc" in metrics or "val/loss" not in metrics else "val/loss"
        # The probe callbacks' scores (KNNProbe, LinearProbe), when a run logs them.
        keys = ["train/acc", val, "val/knn_top1", "val/linear_top1"] if epoch_end else []
        for key in keys:
            if key in metrics:
                parts.append(f"{key} {format_metric(key, float(metrics[key]))}")
        parts.append(self._timing(trainer, batch_idx, now))
        self._reset_window()
        return " | ".join(parts)

    def _timing(self, trainer: L.Trainer, batch_idx: int, now: float) -> str:
        elapsed = now - (self._fit_start or now)
        done = self._batches_done(trainer, batch_idx) - self._batches_at_start
        per_epoch = self.total_train_batches
        epochs = trainer.max_epochs
        text = format_duration(elapsed)
        if done > 0 and math.isfinite(per_epoch) and epochs and epochs > 0:
            left = per_epoch * epochs - self._batches_done(trainer, batch_idx)
            text += f", ETA {format_duration(elapsed / done * max(left, 0))}"
        return text

    def _batches_done(self, trainer: L.Trainer, batch_idx: int) -> float:
        per_epoch = self.total_train_batches
        if not math.isfinite(per_epoch):
            return batch_idx + 1
        return trainer.current_epoch * per_epoch + batch_idx + 1

    def _last_batch_idx(self, trainer: L.Trainer) -> int:
        total = self.total_train_batches
        return int(total) - 1 if math.isfinite(total) else self._batches - 1


def batch_size_of(batch: Any) -> int:
    """Images in a batch: a dict's ``image`` (or first value), a tuple's first item."""
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values()), None))
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 0


def percent_accuracies(metrics: dict[str, Any]) -> dict[str, Any]:
    """Progress-bar metrics with accuracies as ``"77.51 %"`` strings (:func:`format_metric`);
    other values unchanged."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        out[key] = (
            format_metric(key, value) if is_accuracy(key) and isinstance(value, float) else value
        )
    return out


class DistillRichProgressBar(RichProgressBar):
    """Lightning's rich bar (for terminals), with accuracies shown as percentages."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return percent_accuracies(super().get_metrics(trainer, pl_module))


def make_progress_bar(
    mode: ProgressMode = "auto",
    every_n_steps: int | None = None,
    every_minutes: float | None = 2.0,
) -> ProgressBar:
    """The progress bar for a run: ``"lines"`` (:class:`LogLineProgressBar`), ``"bar"``
    (Lightning's rich bar with accuracies in percent, tqdm without rich), or ``"auto"``: lines when stdout is not a
    terminal (a job log, a pipe), the bar in a terminal."""
    if mode not in ("auto", "bar", "lines"):
        raise ConfigError(f"progress must be 'auto', 'bar' or 'lines', got {mode!r}")
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "lines"
    if mode == "lines":
        return LogLineProgressBar(every_n_steps=every_n_steps, every_minutes=every_minutes)
    return DistillRichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
