"""Precise silencing of known dependency noise, never process-wide at import.

Two scopes:

- :func:`quiet_dependencies` wraps a ``visdistill`` command: it drops messages our
  dependencies print on every clean run that say nothing about the user's setup (an
  advertisement from Lightning's logger connector, a deprecation inside Lightning's own
  use of torch's pytree). Everything else, including dependencies' warnings about the
  user's set-up (too few batches for the logging interval, no workers ...), still shows.
- :class:`ExpectedWarnings` is entered by :class:`~visdistill.DistillationModule` while it
  fits, for warnings about things it does on purpose (frozen teachers in eval mode, a
  skipped non-finite step), so Python API users do not see them either.

Each filter names the exact message (and category); none outlives its scope.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.warnings import PossibleUserWarning

# (message regex, category) of dependency warnings with nothing for the user to act on.
DEPENDENCY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # lightning.pytorch.utilities._pytree builds torch's deprecated LeafSpec (Lightning 2.6).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# Prefixes of dependency log lines to drop (Lightning's rank-zero info logger).
DEPENDENCY_LOG_LINES: tuple[str, ...] = (
    "💡 Tip:",  # an advertisement for a cloud logger, printed by every Trainer
    # Printed when our DistillationModelSummary replaces Lightning's default summary.
    "Trainer already configured with model summary callbacks",
)
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


@contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Drop :data:`DEPENDENCY_WARNINGS` and :data:`DEPENDENCY_LOG_LINES` inside the block."""
    drop = _DropLines(DEPENDENCY_LOG_LINES)
    loggers = [logging.getLogger(name) for name in _RANK_ZERO_LOGGERS]
    with warnings.catch_warnings():
        for message, category in DEPENDENCY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


class ExpectedWarnings:
    """Filters for warnings a fit causes on purpose, active between :meth:`enter` and
    :meth:`exit` (idempotent; ``exit`` restores the filters exactly as they were).

    Args:
        eval_modules: the number of modules that are in eval mode on purpose (frozen
            teachers): Lightning's "Found N module(s) in eval mode" is dropped for exactly
            that ``N``, so a user's own module left in eval mode still gets the warning.
        skipped_steps: drop Lightning's "`training_step` returned `None`" (the non-finite
            guard returns ``None`` to skip a step, and warns itself).
        exact_iterable_length: drop Lightning's "Your `IterableDataset` has `__len__`
            defined ... could be inaccurate": the data module streams shards whose length is
            exact per rank and worker (``VisionDataModule.exact_iterable_length``).
    """

    def __init__(
        self,
        eval_modules: int = 0,
        skipped_steps: bool = False,
        exact_iterable_length: bool = False,
    ) -> None:
        self.eval_modules, self.skipped_steps = eval_modules, skipped_steps
        self.exact_iterable_length = exact_iterable_length
        self._context: warnings.catch_warnings | None = None

    def enter(self) -> None:
        if self._context is not None:
            return
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        if self.eval_modules:
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {self.eval_modules} module\(s\) in eval mode",
                category=PossibleUserWarning,
            )
        if self.skipped_steps:
            warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")
        if self.exact_iterable_length:
            warnings.filterwarnings(
                "ignore", message=r"Your `IterableDataset` has `__len__` defined"
            )

    def exit(self) -> None:
        if self._context is None:
            return
        context, self._context = self._context, None
        context.__exit__(None, None, None)
