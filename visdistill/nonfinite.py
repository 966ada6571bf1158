"""What a training step with a NaN/inf loss does: skip it cleanly, stop, or nothing.

A skipped step must leave no trace: :class:`NonFiniteGuard` snapshots the student's and the
terms' buffers (BatchNorm and UNIC running statistics ...) and the torch RNG before the
forward pass and restores them when the loss is not finite; the training step then returns
``None`` (no backward, no optimizer update) and step-interval schedulers do not step. All
ranks skip together, or DDP's gradient all-reduce would hang.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, NonFiniteLossError
from .lightning_private import attached_trainer

MODES = ("skip", "raise", "ignore")
# The skipped-fraction limit applies once this many training steps were tried in the run.
FRACTION_MIN_STEPS = 20
StepState = tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor | None]


class NonFiniteGuard:
    """The non-finite loss policy of one training run and its counters.

    The count of skipped steps that survives checkpoints is the module's ``nonfinite_steps``
    buffer; this object counts this process's run (steps tried, skipped, the current streak).

    Args:
        mode: ``"skip"`` the step (warns, counts in ``train/nonfinite_steps``), ``"raise"`` a
            :class:`NonFiniteLossError`, or ``"ignore"`` (no check, no host sync).
        max_consecutive: with ``"skip"``, stop after this many skipped steps in a row
            (``None``: never).
        max_fraction: with ``"skip"``, stop once more than this fraction of the run's steps
            were skipped, checked from its :data:`FRACTION_MIN_STEPS`-th step on (``None``:
            never).
    """

    def __init__(
        self, mode: str = "skip", max_consecutive: int | None = 10, max_fraction: float | None = 0.5
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"nonfinite must be one of {MODES}, got {mode!r}")
        if max_consecutive is not None and max_consecutive < 1:
            raise ConfigError(
                "nonfinite_max_consecutive must be >= 1 (or null for no limit), got "
                f"{max_consecutive}"
            )
        if max_fraction is not None and not 0 < max_fraction <= 1:
            raise ConfigError(
                f"nonfinite_max_fraction must be in (0, 1] (or null for no limit), got {max_fraction}"
            )
        self.mode, self.max_consecutive, self.max_fraction = mode, max_consecutive, max_fraction
        self.steps_tried = self.steps_skipped = self.skip_streak = 0
        self.step_skipped = False  # the current step's verdict, for the scheduler

    def before_step(self, module: Any) -> StepState | None:
        """Start a training step: the state to restore if it is skipped (``None`` when
        ``mode`` is ``"ignore"``)."""
        self.step_skipped = False
        return snapshot_step_state(module) if self.mode != "ignore" else None

    def skips(
        self, module: Any, total: Tensor, parts: dict[str, Tensor], saved: StepState | None,
        batch_idx: int,
    ) -> bool:  # fmt: skip
        """Whether the step with loss ``total`` (components ``parts``) is skipped; restores
        ``saved`` then. Raises :class:`NonFiniteLossError` in ``"raise"`` mode or past a limit."""
        if saved is None:
            return False
        self.steps_tried += 1
        if not self.loss_is_nonfinite(module, total):
            self.skip_streak = 0
            return False
        # The forward pass already moved BatchNorm/term statistics and the RNG.
        restore_step_state(module, saved)
        self.handle(module, parts, batch_idx)
        return True

    @staticmethod
    def loss_is_nonfinite(module: Any, total: Tensor) -> bool:
        bad = (~torch.isfinite(total.detach())).float()
        trainer = attached_trainer(module)
        if trainer is not None:
            # Every rank must skip together, or DDP's gradient all-reduce would hang.
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        return bool(bad > 0)

    def handle(self, module: Any, parts: dict[str, Tensor], batch_idx: int) -> None:
        """Raise, or count, warn and log a skipped step, naming the components at fault."""
        culprits = [k for k, v in parts.items() if not torch.isfinite(v.detach()).all()]
        where = f"epoch {module.current_epoch}, batch {batch_idx}, global step {module.global_step}"
        named = ", ".join(culprits) or "the total (components finite; another rank's batch)"
        hint = (
            "Lower the learning rate or the term's weight/temperature (OFA: eps), clip "
            "gradients (trainer.gradient_clip_val), and check the data for NaN/inf pixels"
        )
        if self.mode == "raise":
            raise NonFiniteLossError(f"non-finite loss in {named} at {where}. {hint}.")
        module.nonfinite_steps += 1
        self.steps_skipped += 1
        self.skip_streak += 1
        self.step_skipped = True
        count = int(module.nonfinite_steps)
        self.check_limits(named, where, hint)
        if count == 1 or count % 100 == 0:
            warnings.warn(
                f"skipped training step {count} with a non-finite loss in {named} at {where} "
                f"(nonfinite: skip). {hint}; or set nonfinite: raise to stop.",
                RuntimeWarning,
                stacklevel=2,
            )
        module.log("train/nonfinite_steps", float(count), batch_size=1)

    def check_limits(self, named: str, where: str, hint: str) -> None:
        """Stop with a :class:`NonFiniteLossError` when too many steps were skipped in a row
        or in all (``max_consecutive`` / ``max_fraction``)."""
        streak, tried, skipped = self.skip_streak, self.steps_tried, self.steps_skipped
        limit = self.max_consecutive
        if limit is not None and streak >= limit:
            raise NonFiniteLossError(
                f"stopping: {streak} training steps in a row had a non-finite loss (the last in "
                f"{named} at {where}; nonfinite_max_consecutive: {limit}). {hint}."
            )
        frac = self.max_fraction
        if frac is not None and tried >= FRACTION_MIN_STEPS and skipped > frac * tried:
            raise NonFiniteLossError(
                f"stopping: {skipped} of {tried} training steps had a non-finite loss, more than "
                f"nonfinite_max_fraction: {frac} (the last in {named} at {where}). {hint}."
            )

    def scheduler_may_step(self, module: Any, scheduler: Any) -> bool:
        """Lightning steps ``interval: step`` schedulers after every batch, also after one
        whose training step returned ``None``: a skipped step does not count."""
        trainer = attached_trainer(module)
        if self.step_skipped and trainer is not None:
            configs = [c for c in trainer.lr_scheduler_configs if c.scheduler is scheduler]
            if configs and configs[0].interval == "step":
                return False
        return True

    def warn_at_train_end(self, module: Any) -> None:
        if self.steps_skipped:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{self.steps_skipped} of {self.steps_tried} training steps of this run were "
                f"skipped for a non-finite loss ({int(module.nonfinite_steps)} in all, counting "
                "resumed runs; train/nonfinite_steps). Check the data and the learning rate.",
                category=RuntimeWarning,
            )


def snapshot_step_state(module: Any) -> StepState:
    """Copies of the student's and the terms' buffers and the torch RNG states, taken
    before a training step's forward pass (a few BatchNorm vectors: cheap)."""
    seen: set[int] = set()
    buffers = []
    for part in (module.student, module.terms):
        for buf in part.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                buffers.append((buf, buf.detach().clone()))
    cuda = module.device.type == "cuda"
    cuda_rng = torch.cuda.get_rng_state(module.device) if cuda else None
    return buffers, torch.get_rng_state(), cuda_rng


@torch.no_grad()
def restore_step_state(module: Any, saved: StepState) -> None:
    """Undo a skipped step's forward pass: buffers and RNG back to the snapshot."""
    buffers, cpu_rng, cuda_rng = saved
    for buf, copy in buffers:
        buf.copy_(copy)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, module.device)
