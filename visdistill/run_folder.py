"""One run per run folder: ``fit`` refuses a folder holding another run, and locks its own.

The shipped configs give their logger a fixed folder (``version: ""``: ``runs/<name>/``), so
every run of a config writes the same place. Before any work, ``visdistill fit`` checks that
folder (:func:`prepare_run_folder`):

- it holds no checkpoints or logs of another run, unless the run resumes a checkpoint from
  this very folder (``--ckpt_path last`` or a path in it), or ``--run_folder`` says what to do:
  ``overwrite`` (write into it anyway; files of the same name are replaced, nothing else is
  deleted) or ``new_version`` (log to the next free ``version_N`` below the folder);
- it is writable (the lock file is created there);
- no other live run holds it: :class:`RunFolderLock` keeps ``.visdistill.lock`` locked
  (``flock``) and writes its pid, host and start time into it. A lock whose process is gone
  (killed, crashed) is taken over: the operating system drops ``flock`` locks of dead
  processes, and on file systems without ``flock`` the pid is checked on the same host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .errors import ConfigError
from .lightning_private import logger_fixed_version, logger_version_settable, set_logger_version

MODES = ("refuse", "overwrite", "new_version")
LOCK_NAME = ".visdistill.lock"
# Files that mark a folder as holding a run: checkpoints (in the checkpoint folders) and the
# loggers' own files (in the run folder).
_LOG_PATTERNS = ("events.out.tfevents.*", "metrics.csv", "hparams.yaml")


def checkpoint_dirs(trainer: Any) -> list[Path]:
    """Where the trainer's ``ModelCheckpoint`` callbacks will write, resolved the way
    Lightning resolves them at setup (``dirpath``, else the logger's
    ``save_dir/name/version/checkpoints``, else ``default_root_dir/checkpoints``)."""
    folders = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath:
            folders.append(Path(callback.dirpath))
            continue
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None:
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            folders.append(Path(save_dir, str(logger.name), version, "checkpoints"))
        else:
            folders.append(Path(trainer.default_root_dir, "checkpoints"))
    return list(dict.fromkeys(folders))


def run_dir(trainer: Any) -> Path:
    """The folder the run logs to (``trainer.log_dir``)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def previous_run_files(trainer: Any) -> list[Path]:
    """Checkpoints and logger files of an earlier run in this run's folders."""
    found = [p for d in checkpoint_dirs(trainer) if d.is_dir() for p in d.glob("*.ckpt")]
    folder = run_dir(trainer)
    if folder.is_dir():
        found += [p for pattern in _LOG_PATTERNS for p in folder.glob(pattern)]
    return sorted(set(found))


def prepare_run_folder(
    trainer: Any, mode: str, ckpt_path: str | None, requested: str | None = None
) -> RunFolderLock | None:
    """Check the run folder before any work and lock it; returns the lock (a callback that
    releases it when the fit ends), or ``None`` on ranks other than 0 and with
    ``fast_dev_run`` (which writes nothing).

    Args:
        ckpt_path: the checkpoint the fit resumes from (resolved), or ``None``.
        requested: the ``--ckpt_path`` as given. ``last`` that found no checkpoint accepts a
            folder holding only logs: a run killed before its first checkpoint, restarted.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

    if mode not in MODES:
        raise ConfigError(f"--run_folder must be one of {', '.join(MODES)}, got {mode!r}")
    if trainer.fast_dev_run or getattr(rank_zero_only, "rank", 0) != 0:
        return None
    if ckpt_path:
        _continue_in_checkpoints_folder(trainer, ckpt_path)
    occupied = previous_run_files(trainer)
    if occupied and ckpt_path and _resumes_from(trainer, ckpt_path):
        occupied = []  # the same run, continued
    if requested == "last" and not any(p.suffix == ".ckpt" for p in occupied):
        occupied = []  # the same run, killed before its first checkpoint
    if occupied:
        folder = run_dir(trainer)
        names = ", ".join(p.name for p in occupied[:4]) + (", ..." if len(occupied) > 4 else "")
        if mode == "refuse":
            raise ConfigError(
                f"run folder {folder} already holds another run ({names}). Resume that run with "
                "--ckpt_path last, keep it and log this one to a new folder with --run_folder "
                "new_version, or write into it anyway with --run_folder overwrite (its "
                "best.ckpt/last.ckpt are then replaced)"
            )
        if mode == "overwrite":
            rank_zero_warn(
                f"--run_folder overwrite: writing into {folder}, which holds another run "
                f"({names}); its checkpoints of the same name are replaced"
            )
        else:
            new = _next_version(trainer)
            rank_zero_warn(f"run folder {folder} holds another run; this run logs to {new}")
    folders = [run_dir(trainer)]
    folders += [d for d in checkpoint_dirs(trainer) if folders[0] not in d.parents]
    lock = RunFolderLock(folders)
    lock.acquire()
    _remove_orphaned_temporaries(checkpoint_dirs(trainer))
    return lock


# AtomicCheckpointIO's temporary files: ".last.ckpt.k2j4_x9a.tmp" (tempfile.mkstemp).
_TEMPORARY = re.compile(r"\..+\.ckpt\.[A-Za-z0-9_]{8}\.tmp")


def _remove_orphaned_temporaries(folders: list[Path]) -> None:
    """Delete the temporary checkpoint files a killed run left (with the lock held, no run
    is writing them); only files of AtomicCheckpointIO's naming are touched."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    removed = [
        p for d in folders if d.is_dir() for p in d.iterdir()
        if p.is_file() and _TEMPORARY.fullmatch(p.name)
    ]  # fmt: skip
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        rank_zero_info(
            f"removed {len(removed)} temporary checkpoint file(s) a killed run left in "
            f"{removed[0].parent}"
        )


def _resumes_from(trainer: Any, ckpt_path: str) -> bool:
    path = Path(ckpt_path).resolve()
    return any(path.parent == d.resolve() for d in checkpoint_dirs(trainer))


def _continue_in_checkpoints_folder(trainer: Any, ckpt_path: str) -> None:
    """A logger with a fixed folder (a string ``version``, as in the shipped configs) that
    resumes a checkpoint of a ``version_N`` below that folder (``--run_folder new_version``)
    continues in that version's folder, not in the folder above it. Auto-numbered versions
    keep Lightning's behaviour: the resumed run logs to a new version."""
    logger = trainer.loggers[0] if trainer.loggers else None
    fixed = logger_fixed_version(logger) if logger is not None else None
    if fixed is None or _resumes_from(trainer, ckpt_path):
        return
    folder = Path(ckpt_path).resolve().parent
    base = run_dir(trainer).resolve()
    if folder.name == "checkpoints" and base in folder.parents:
        set_logger_version(logger, os.path.join(fixed, *folder.parent.relative_to(base).parts))


def _next_version(trainer: Any) -> Path:
    """Point the logger at the next free ``version_N`` below its folder."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None or not logger_version_settable(logger):
        raise ConfigError(
            "--run_folder new_version needs a TensorBoard or CSV logger (trainer.logger); "
            "set another trainer.default_root_dir instead"
        )
    base = run_dir(trainer)
    n = 1
    while (base / f"version_{n}").exists():
        n += 1
    version = logger.version
    set_logger_version(logger, os.path.join(version, f"version_{n}") if version else f"version_{n}")
    return run_dir(trainer)


class RunFolderLock(Callback):
    """An exclusive lock on run folders for the length of a fit (see the module docstring).

    Args:
        folders: folders to lock (created when missing: this also checks they are
            writable, before any work).
    """

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        self._held: list[tuple[Path, int]] = []

    def acquire(self) -> None:
        try:
            for folder in self.folders:
                self._held.append((folder, _lock(folder)))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._held:
            folder, fd = self._held.pop()
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                _flock(fd, unlock=True)
            os.close(fd)

    # The fit ends normally (teardown) or with an exception: release in both cases.
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.release()

    def state_dict(self) -> dict[str, Any]:
        return {}


def _lock(folder: Path) -> int:
    """Create, lock and fill ``folder/.visdistill.lock``; return its descriptor."""
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(
            f"cannot write to the run folder {folder}: {e.strerror or e}. Choose a writable "
            "folder (trainer.logger's save_dir, or trainer.default_root_dir)"
        ) from None
    try:
        locked = _flock(fd)
        holder = _read_holder(fd)
        if not locked or (holder and not _is_stale(holder, flock_works=locked is not None)):
            raise ConfigError(
                f"run folder {folder} is in use by another run (pid {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, started {holder.get('started', '?')}). Wait for "
                "it to finish, or give this run another folder (--run_folder new_version). If "
                f"that process is gone (another machine cannot be checked), delete {path}"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _flock(fd: int, unlock: bool = False) -> bool | None:
    """Non-blocking exclusive ``flock``: True when taken, False when another process holds
    it, None when the file system does not support it."""
    try:
        import fcntl
    except ImportError:  # Windows: the pid check alone
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_UN if unlock else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _read_holder(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return {}  # released cleanly
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict[str, Any], flock_works: bool) -> bool:
    """Whether the run that wrote ``holder`` is gone: on this host, when we got its
    ``flock`` or its pid is dead. Another host's run cannot be checked (network file systems
    do not always share ``flock``): never stale."""
    if holder.get("host") != socket.gethostname():
        return False
    if flock_works:
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True
    return process_gone(socket.gethostname(), pid)


def process_gone(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` no longer runs. Only this host's processes can be
    checked: another host's is never reported gone."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
