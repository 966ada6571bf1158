"""Every place visdistill reaches into Lightning's private API, in one module.

Lightning's private names (a leading underscore) can change in any release. Each function
here says why it needs one, the Lightning version it was checked against, and the public
API that would replace it; nothing else in the package touches a private Lightning name.
When Lightning is upgraded, re-check this file (``tests/test_lightning_private.py`` runs
each function against the installed Lightning).

Checked against Lightning 2.6.6.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

CHECKED_VERSION = "2.6.6"

#: Whether ``rich`` (Lightning's rich progress bar) can be used.
#: Private: ``lightning.pytorch.utilities.imports._RICH_AVAILABLE``, the same test
#: ``RichProgressBar`` makes. Public replacement: none in Lightning;
#: ``lightning_utilities.core.imports.RequirementCache("rich>=10.2.2")`` repeats it, with
#: the minimum version copied from Lightning.
RICH_AVAILABLE = _RICH_AVAILABLE  # truthy when usable; checked on first use


def attached_trainer(module: Any) -> Any:
    """The trainer ``module`` (a LightningModule) is attached to, or ``None``.

    Public only: ``module.trainer`` raises ``RuntimeError`` when no trainer is attached
    (a module used on its own, in tests or for export); this avoids reading the private
    ``module._trainer``.
    """
    try:
        return module.trainer
    except RuntimeError:
        return None


def logs_reach_loggers(trainer: Any) -> bool:
    """Whether this training step's logged metrics go to the loggers
    (``trainer.log_every_n_steps``), so that costly extra logging can be limited to them.

    Private: ``trainer._logger_connector.should_update_logs``, Lightning's own test (it
    counts the fit loop's ``_batches_that_stepped``, also private). Public replacement: none;
    ``(trainer.global_step + 1) % trainer.log_every_n_steps == 0`` agrees in plain automatic
    optimisation but not under manual optimisation or after a skipped optimizer step.
    Answers ``True`` (log) if the property is gone.
    """
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


def uses_distributed_sampler(trainer: Any) -> bool:
    """The trainer's ``use_distributed_sampler`` flag: whether a data module should shard
    its own sampler across ranks (Lightning would otherwise wrap it).

    Private: ``trainer._accelerator_connector.use_distributed_sampler`` (the Trainer
    argument is not exposed as a property). Public replacement: none; a
    ``Trainer.use_distributed_sampler`` property would be it. ``True`` if it is gone
    (Lightning's default).
    """
    connector = getattr(trainer, "_accelerator_connector", None)
    return bool(getattr(connector, "use_distributed_sampler", True))


def fit_train_dataloader(trainer: Any) -> Any:
    """The training loader(s) given to ``trainer.fit`` (a data module's
    ``train_dataloader()`` or the ``train_dataloaders`` argument), usable in
    ``on_fit_start``, before the fit loop has set up its data; ``None`` when there is none.

    Private: ``trainer.fit_loop._data_source`` for loaders passed straight to ``fit()``.
    Public replacement: ``trainer.train_dataloader``, which is ``None`` until the fit loop
    starts (after ``on_fit_start``): a pass over the data in ``on_train_start`` could use it.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return datamodule.train_dataloader()
    source = trainer.fit_loop._data_source
    return source.dataloader() if source.is_defined() else None


def set_logger_version(logger: Any, version: str) -> None:
    """Point a CSV or TensorBoard logger at another version sub-folder before it has
    written anything (``--run_folder new_version``, and a resumed ``version_N``).

    Private: the loggers keep their version in ``_version`` and expose it read-only
    (``logger.version``). Public replacement: construct a new logger with
    ``version=...`` and assign ``trainer.logger``; not done because the logger's other
    constructor arguments (any logger class, user-configured) cannot be recovered in general.
    """
    if not logger_version_settable(logger):
        raise AttributeError(f"{type(logger).__name__} keeps no _version")
    logger._version = os.fspath(version)


def logger_version_settable(logger: Any) -> bool:
    """Whether :func:`set_logger_version` can point ``logger`` elsewhere (CSV and
    TensorBoard loggers: they keep a private ``_version``)."""
    return hasattr(logger, "_version")


def logger_fixed_version(logger: Any) -> str | None:
    """The logger's version when it was configured as a fixed folder name (a string), or
    ``None`` (auto-numbered, or not yet chosen). Read from the private ``_version``:
    ``logger.version`` would pick (and create) the next free number as a side effect."""
    version = getattr(logger, "_version", None)
    return version if isinstance(version, str) else None


def repair_epoch_progress(trainer: Any) -> None:
    """Work around a Lightning 2.6 restart bug; call at every training batch start.

    Resumed from a checkpoint written after an epoch's last batch (before the epoch end:
    ``--checkpoint_every_n_steps``), Lightning's fit loop stays "restarted mid-epoch" for the
    *next* epoch too: it skips that epoch's ``on_train_epoch_start`` hooks and its epoch
    counters (``ready``/``started``). Every checkpoint written during that epoch then looks
    like "epoch finished", and resuming one replays the epoch from its first batch instead
    of continuing (found by the SIGKILL test in ``tests/test_data_safety.py``). A batch
    starting while the epoch is not marked started is exactly that case: mark it started
    and run the skipped hooks, as an uninterrupted run does.

    Private: ``lightning.pytorch.trainer.call._call_callback_hooks`` and
    ``_call_lightning_module_hook`` (how the fit loop runs hooks, with profiling and the
    hook bookkeeping); ``fit_loop.epoch_progress`` is a public loop attribute. Public
    replacement: none; the fix belongs in Lightning's ``_FitLoop`` restart logic, and this
    function can go once a release fixes it (the SIGKILL test tells).
    """
    from lightning.pytorch.trainer import call

    progress = trainer.fit_loop.epoch_progress
    if progress.current.started != progress.current.processed:
        return  # the normal case: a started, unfinished epoch
    progress.increment_ready()
    call._call_callback_hooks(trainer, "on_train_epoch_start")
    call._call_lightning_module_hook(trainer, "on_train_epoch_start")
    progress.increment_started()


def fit_loop_checkpoint_state(checkpoint: dict[str, Any]) -> tuple[bool, list[Any]]:
    """From a Lightning checkpoint: whether it was written after the epoch's last training
    batch, and the training loaders' saved states (the ``state_dict`` of each loader that
    has one, e.g. :class:`~visdistill.data.resumable.ResumableDataLoader`), mutable in place.

    Private: the layout of ``checkpoint["loops"]["fit_loop"]`` (keys
    ``epoch_loop.batch_progress`` → ``is_last_batch`` and ``state_dict`` →
    ``combined_loader``) is the loops' internal ``state_dict``, not a documented format.
    Public replacement: none. Missing keys read as "not the last batch, no states".
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    last = bool(fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"))
    states = fit_loop.get("state_dict", {}).get("combined_loader") or []
    return last, states
