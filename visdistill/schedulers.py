"""Learning-rate schedules that a YAML config can name on their own.

A LightningCLI config gives ``model.scheduler`` one class that receives the optimizer, so
torch's ``SequentialLR(LinearLR, CosineAnnealingLR)`` (two schedulers built around the same
optimizer) cannot be written there. :class:`WarmupCosineLR` is that common pair as one class.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .errors import ConfigError


class WarmupCosineLR(LambdaLR):
    """Linear warm-up, then cosine decay: the factor on each param group's lr after ``t``
    scheduler steps (epochs or optimizer steps, as ``scheduler_interval`` says) is

    - ``start_factor + (1 - start_factor) * t / warmup`` for ``t < warmup``,
    - ``min_factor + (1 - min_factor) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2``
      from ``warmup`` to ``total``, and ``min_factor`` after ``total``.

    Args:
        optimizer: the optimizer (LightningCLI passes it).
        warmup: steps of linear warm-up (0: none).
        total: steps of the whole schedule (``max_epochs`` with ``scheduler_interval: epoch``).
        start_factor: factor at the first step (> 0, so the first step trains).
        min_factor: factor at the end of the decay.

    Example (``model:`` section)::

        scheduler:
          class_path: visdistill.WarmupCosineLR
          init_args: {warmup: 5, total: 100}
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: int,
        total: int,
        start_factor: float = 0.01,
        min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= warmup < total:
            raise ConfigError(
                f"WarmupCosineLR needs 0 <= warmup < total, got warmup={warmup}, total={total}; "
                "total counts every scheduler step (epochs, or optimizer steps with "
                "scheduler_interval: step), warm-up included"
            )
        if not 0 < start_factor <= 1 or not 0 <= min_factor <= 1:
            raise ConfigError(
                f"WarmupCosineLR factors must be 0 < start_factor <= 1 and 0 <= min_factor <= 1, "
                f"got start_factor={start_factor}, min_factor={min_factor}"
            )
        self.warmup, self.total = int(warmup), int(total)
        self.start_factor, self.min_factor = float(start_factor), float(min_factor)
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        """The lr factor after ``step`` scheduler steps."""
        if step < self.warmup:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )
