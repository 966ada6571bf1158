"""What a distillation run reports: the models before it starts, the results when it ends.

- :class:`DistillationModelSummary` replaces Lightning's generic module table (which lists
  metric objects, reports frozen teachers' mode and FLOPs it does not measure) with the
  student, each teacher and each term: parameters, FLOPs per image measured with
  ``torch.utils.flop_counter`` at the size each model runs at, input specs, and the
  teacher/student compute ratio.
- :class:`RunSummary` prints, at the end of a fit (or after the test that follows it), the
  best ``val/acc`` and its epoch, the test accuracy of the student, of each teacher and of
  the ensemble, the student's gap to the best teacher, wall time and images/s, the best
  checkpoint and the command that exports it; the same goes to ``<run dir>/summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .checkpoints import atomic_write
from .formatting import format_count, format_duration, format_metric
from .progress import batch_size_of
from .teachers import ENSEMBLE

SUMMARY_FILE = "summary.json"


def count_flops(model: nn.Module, image_size: int | tuple[int, int]) -> int | None:
    """Forward FLOPs of ``model`` for one canonical ``(1, 3, H, W)`` image (a multiply-add
    counts 2), from ``torch.utils.flop_counter``; ``None`` when the count fails.

    Runs in eval mode under ``no_grad`` and restores the training flag, so BatchNorm
    statistics and the RNG are untouched.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, h, w, device=device))
        return int(counter.get_total_flops())
    except Exception:  # an op the counter cannot trace: the column says "?"
        return None
    finally:
        model.train(was_training)


def _params(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def _spec_text(spec: Any, data_size: int | None) -> str:
    if spec.size is not None:
        size = (
            f"{spec.size[0]} px"
            if spec.size[0] == spec.size[1]
            else f"{spec.size[0]}x{spec.size[1]}"
        )
    else:
        size = f"{data_size} px (data)" if data_size else "data size"
    mean = "/".join(f"{m:.3g}" for m in spec.mean)
    std = "/".join(f"{s:.3g}" for s in spec.std)
    gray = ", gray" if spec.in_chans == 1 else ""
    return f"{size}, mean {mean}, std {std}{gray}"


def _table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _data_image_size(trainer: L.Trainer | None) -> int | None:
    size = getattr(getattr(trainer, "datamodule", None), "image_size", None)
    return size if isinstance(size, int) else None


def describe_models(module: L.LightningModule, data_size: int | None = None) -> str:
    """The distiller's model summary of a :class:`~visdistill.DistillationModule` as text."""
    student, teachers = module.student, list(module.teachers or [])
    names = getattr(module, "teacher_names", [t.alias for t in teachers])
    size = data_size or 224
    flops = {"student": count_flops(student, size)}
    for name, teacher in zip(names, teachers, strict=True):
        flops[name] = count_flops(teacher, size)
    show_flops = any(f for f in flops.values())
    head = ["", "name", "model", "params", "trainable"] + (["FLOPs/img"] if show_flops else [])
    rows = [head + ["input"]]

    def row(role: str, name: str, model: nn.Module, key: str, arch: str, spec: Any) -> list[str]:
        trainable = _params(model, True)
        cells = [
            role,
            name,
            arch,
            format_count(_params(model), " "),
            format_count(trainable, " ") if trainable else "frozen",
        ]
        if show_flops:
            f = flops.get(key)
            cells.append(format_count(f, " ") if f else "?")
        return cells + [_spec_text(spec, data_size)]

    rows.append(row("student", student.alias, student, "student", student.name, student.input_spec))
    for name, teacher in zip(names, teachers, strict=True):
        rows.append(row("teacher", name, teacher, name, teacher.name, teacher.input_spec))
    for term in getattr(module, "terms", []):
        extra = _params(term, True)
        cells = [
            "term",
            term.name,
            type(term).__name__,
            format_count(_params(term), " "),
            format_count(extra, " ") if extra else "0",
        ]
        rows.append(cells + ([""] if show_flops else []) + [f"weight {term.weight:g}"])
    lines = [
        f"visdistill: {len(teachers)} teacher(s) -> {student.alias}"
        + (
            f" (FLOPs per image at the data's {data_size} px, torch.utils.flop_counter)"
            if show_flops and data_size
            else ""
        ),
        _table(rows),
    ]
    teacher_flops = [flops[n] for n in names]
    if teachers and flops["student"] and all(teacher_flops):
        ratio = sum(teacher_flops) / flops["student"]
        lines.append(
            f"  compute: the teachers' forward passes cost {ratio:.1f}x the student's forward "
            "per image (a training step adds the student's backward, about 2x its forward)"
        )
    return "\n".join(lines)


class DistillationModelSummary(ModelSummary):
    """Prints :func:`describe_models` when fit starts (rank zero), instead of Lightning's
    module table. Falls back to Lightning's table for a module without student/teachers."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "student"):
            super().on_fit_start(trainer, pl_module)
            return
        if trainer.is_global_zero:
            print(describe_models(pl_module, _data_image_size(trainer)), flush=True)


class RunSummary(Callback):
    """The end-of-run report, printed on rank zero and written to ``summary.json`` in the
    run's log directory (``trainer.log_dir``).

    Args:
        report_after_test: print the summary after the test that follows the fit (the CLI's
            ``test_after_fit``), not at the end of the fit. A test after a fit always
            updates ``summary.json`` and prints the completed summary.
        filename: name of the JSON file in the run directory.
    """

    def __init__(self, report_after_test: bool = False, filename: str = SUMMARY_FILE) -> None:
        self.report_after_test, self.filename = report_after_test, filename
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        # The metric best_val is of: val/acc, or val/loss when no accuracy is measured.
        self.best_metric = "val/acc"
        self.path: Path | None = None
        self.record: dict[str, Any] = {}
        self._t0 = self._fit_s = self._test_t0 = None
        self._images = 0
        self._fitted = False
        self._pending: str | None = None  # text printed at teardown

    # Best val/acc (or val/loss) and its epoch survive a resume (Lightning saves callback state).
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_val = state_dict.get("best_val")
        self.best_epoch = state_dict.get("best_epoch")
        self.best_metric = state_dict.get("best_metric", "val/acc")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0, self._images, self._fitted = time.monotonic(), 0, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += batch_size_of(batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # `visdistill validate`
            names = getattr(pl_module, "teacher_names", [])
            scores = _scores(trainer.callback_metrics, "val", names)
            self._pending = format_scores("validate", scores, trainer.ckpt_path)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        select = getattr(pl_module, "selection_metric", None)
        metric, mode = select() if select else ("val/acc", "max")
        value = trainer.callback_metrics.get(metric)
        if value is None:
            return
        value, best = float(value), self.best_val
        if (
            metric != self.best_metric
            or best is None
            or (value > best if mode == "max" else value < best)
        ):
            self.best_val, self.best_epoch, self.best_metric = value, trainer.current_epoch, metric

    def on_fit_end(self, trainer, pl_module) -> None:
        self._fit_s = time.monotonic() - (self._t0 or time.monotonic())
        self._fitted = True
        self.record = self._fit_record(trainer, pl_module)
        self._write(trainer)
        if not self.report_after_test:
            self._pending = self.format()

    def on_test_start(self, trainer, pl_module) -> None:
        self._test_t0 = time.monotonic()

    def on_test_end(self, trainer, pl_module) -> None:
        test_s = time.monotonic() - (self._test_t0 or time.monotonic())
        scores = _scores(trainer.callback_metrics, "test", getattr(pl_module, "teacher_names", []))
        if not self._fitted:  # `visdistill test`: the results alone
            self._pending = format_scores("test", scores, trainer.ckpt_path)
            return
        self.record["test"] = scores
        self.record["test_s"] = round(test_s, 2)
        self.record["wall_s"] = round(time.monotonic() - self._t0, 2)
        self.record.update(_gap(scores))
        self._write(trainer)
        self._pending = self.format()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Printed here, after the progress bar's own teardown has closed a live rich display
        # (the CLI puts the bar before this callback), so the two never interleave.
        if self._pending is not None and trainer.is_global_zero:
            print(self._pending, flush=True)
        self._pending = None

    # ------------------------------------------------------------------ the record
    def _fit_record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") or None
        # The newest checkpoint: from a callback without a monitor (visdistill's last.ckpt).
        latest = [c for c in trainer.checkpoint_callbacks if c.monitor is None]
        last = (latest[0].best_model_path or None) if latest else None
        names = getattr(pl_module, "teacher_names", [])
        val = _scores(trainer.callback_metrics, "val", names)
        fit_s = self._fit_s or 0.0
        record: dict[str, Any] = {
            "run_dir": str(run_dir),
            "student": getattr(getattr(pl_module, "student", None), "name", None),
            "teachers": [t.name for t in (getattr(pl_module, "teachers", None) or [])],
            "teacher_names": names,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "best_val_acc": self.best_val if self.best_metric == "val/acc" else None,
            "best_val_loss": self.best_val if self.best_metric == "val/loss" else None,
            "best_epoch": self.best_epoch + 1 if self.best_epoch is not None else None,
            "val": val,
            "fit_s": round(fit_s, 2),
            "wall_s": round(fit_s, 2),
            "train_images": self._images,
            "train_images_per_s": round(self._images / fit_s, 1) if fit_s > 0 else None,
            "best_checkpoint": best,
            "last_checkpoint": last,
            "export_command": (
                f"visdistill export {best} --out {run_dir / 'student'}" if best else None
            ),
            "nonfinite_steps": int(getattr(pl_module, "nonfinite_steps", 0)),
        }
        record.update(_gap(val))
        return record

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        self.path = Path(self.record["run_dir"]) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.record, indent=2) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def format(self) -> str:
        """The summary as printed."""
        r = self.record
        lines = [f"visdistill run summary ({r['run_dir']})"]
        epochs = r.get("epochs")
        if r.get("best_val_acc") is not None:
            lines.append(
                f"  best val/acc    {format_metric('acc', r['best_val_acc'])} "
                f"at epoch {r['best_epoch']} of {epochs}"
            )
        elif r.get("best_val_loss") is not None:  # no accuracy: headless or unlabelled
            lines.append(
                f"  best val/loss   {format_metric('loss', r['best_val_loss'])} "
                f"at epoch {r['best_epoch']} of {epochs} (distillation loss; no accuracy)"
            )
        scores, split = (r["test"], "test") if r.get("test") else (r.get("val") or {}, "val")
        if scores:
            lines.append(f"  {split} {_label(scores)}".ljust(18) + _scores_text(scores))
        if r.get("best_teacher") is not None:
            lines.append(
                f"  gap to best     {r['gap_to_best_teacher']:+.2f} points vs "
                f"{r['best_teacher']} ({split})"
            )
        timing = f"  wall time       {format_duration(r['wall_s'])}"
        if r.get("test_s") is not None:
            timing += f" (fit {format_duration(r['fit_s'])}, test {format_duration(r['test_s'])})"
        if r.get("train_images_per_s"):
            timing += f"; {r['train_images']:,} training images, {r['train_images_per_s']:.0f} img/s over the fit"
        lines.append(timing)
        if r.get("nonfinite_steps"):
            lines.append(f"  skipped steps   {r['nonfinite_steps']} (non-finite loss)")
        if r.get("best_checkpoint"):
            lines.append(f"  best checkpoint {r['best_checkpoint']}")
            lines.append(f"  export it       {r['export_command']}")
        if self.path is not None:
            lines.append(f"  summary         {self.path}")
        return "\n".join(lines)


def _scores(metrics: dict[str, Any], split: str, teacher_names: list[str]) -> dict[str, Any]:
    """``{"student": acc, "teachers": {name: acc}, "ensemble": acc}`` from logged metrics;
    without a student accuracy (headless student, data without labels) ``"loss"``: the
    distillation loss."""

    def get(key: str) -> float | None:
        value = metrics.get(key)
        return None if value is None else float(value)

    out: dict[str, Any] = {}
    if (student := get(f"{split}/acc")) is not None:
        out["student"] = student
    elif (loss := get(f"{split}/loss")) is not None:
        out["loss"] = loss
    teachers = {n: v for n in teacher_names if (v := get(f"{split}/{n}_acc")) is not None}
    if teachers:
        out["teachers"] = teachers
    if (ensemble := get(f"{split}/{ENSEMBLE}_acc")) is not None:
        out[ENSEMBLE] = ensemble
    return out


def _gap(scores: dict[str, Any]) -> dict[str, Any]:
    teachers = scores.get("teachers") or {}
    if "student" not in scores or not teachers:
        return {}
    best = max(teachers, key=teachers.get)
    return {
        "best_teacher": best,
        "gap_to_best_teacher": round(100 * (scores["student"] - teachers[best]), 2),
    }


def _scores_text(scores: dict[str, Any]) -> str:
    parts = []
    if "student" in scores:
        parts.append(f"student {format_metric('acc', scores['student'])}")
    if "loss" in scores:
        parts.append(f"student distillation loss {format_metric('loss', scores['loss'])}")
    parts += [f"{n} {format_metric('acc', v)}" for n, v in (scores.get("teachers") or {}).items()]
    if ENSEMBLE in scores:
        parts.append(f"{ENSEMBLE} {format_metric('acc', scores[ENSEMBLE])}")
    return " | ".join(parts)


def format_scores(what: str, scores: dict[str, Any], ckpt_path: str | None) -> str:
    """One block for ``visdistill test`` / ``validate``: top-1 of student and teachers."""
    source = f" ({ckpt_path})" if ckpt_path else ""
    text = _scores_text(scores) or "no accuracy logged"
    return f"visdistill {what}{source}\n  {_label(scores)}  {text}"


def _label(scores: dict[str, Any]) -> str:
    """``top-1`` when the scores hold an accuracy, ``loss`` when only the loss."""
    return "loss" if set(scores) == {"loss"} else "top-1"
