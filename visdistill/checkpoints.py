"""Reading weights safely: safetensors, or ``torch.load(weights_only=True)``.

Handles the layouts users bring: a plain state dict, a Lightning checkpoint
(``state_dict``), DataParallel (``module.``) and wrapper (``model.``) prefixes, and
visdistill's own Lightning checkpoints (``student.model.``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, ConfigError, format_keys

# Tried in order, each stripped only when *every* key carries it, so a real
# top-level module called ``model`` is never mangled.
STRIPPABLE_PREFIXES = ("module.", "student.model.", "model.")
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def read_checkpoint_file(
    path: str | os.PathLike, fix: str, mmap: bool = False, safetensors: bool = False
) -> Any:
    """The contents of a checkpoint file, never unpickling code: ``torch.load(weights_only=
    True)`` (or safetensors' ``load_file`` when ``safetensors`` and the suffix is
    ``.safetensors``). A missing, empty, code-carrying or unreadable file is one
    :class:`CheckpointError` naming it; ``fix`` (what to do instead) ends the messages of
    a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (resolved: {path.resolve()}); {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is an empty file (0 bytes): the write that made it was "
            f"interrupted. {fix[0].upper() + fix[1:]}"
        )
    try:
        if safetensors and path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors, which visdistill refuses "
            f"to load (weights_only=True). Re-save it as a plain state dict or safetensors. "
            f"torch said: {str(e).splitlines()[0]}"
        ) from e  # the cause tells callers (the mmdet integration) what refused the file
    except Exception as e:  # truncated or not a checkpoint at all
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, without unpickling code.

    Returns a flat ``{name: tensor}`` dict with the wrapper prefixes removed.
    """
    state = read_checkpoint_file(
        path,
        "check the path, or train/export the model first",
        safetensors=True,
    )
    return clean_state_dict(state, source=str(path))


def clean_state_dict(state: object, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Unwrap nested checkpoints and strip common prefixes.

    ``state`` may be ``{"state_dict": {...}}`` (Lightning), ``{"model": {...}}`` or
    a flat mapping of tensors.
    """
    if isinstance(state, dict):
        for key in _NESTED_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not a state dict of tensors")
    if not state:
        raise CheckpointError(f"{source} is empty")
    for prefix in STRIPPABLE_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Strictly load ``state`` into ``model``; mismatches raise one clear error.

    Missing and unexpected keys and shape mismatches are listed together, so a user
    sees everything wrong at once instead of the first torch traceback.
    """
    expected = model.state_dict()
    # BatchNorm counters are bookkeeping, not weights: many exported files drop them.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {format_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {format_keys(wrong_shape, 5)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check the architecture name, num_classes and model_kwargs the weights were trained with."
        )
    model.load_state_dict(state, strict=False)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk
    (``fsync``), then rename it onto ``path`` and flush the folder: a crash at any point
    leaves the previous file or the new one, never a truncated one. (A SIGKILL during
    ``write`` can leave the hidden ``.NAME.*.tmp`` file, which nothing reads.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise :class:`ConfigError` unless a file can be written at ``path`` (its folder is
    created if missing; a probe file is created beside it and removed). For checking an
    output before hours of work, not after."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"cannot write the {what} {path}: {e.strerror or e}. Choose a writable path"
        ) from None
    if path.is_dir():
        raise ConfigError(f"the {what} {path} is a folder; give a file path")
    return path


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing local ``.ckpt`` files with
    :func:`atomic_write`: temporary file in the checkpoint's own folder, ``fsync``, rename.

    Lightning's own save goes through an fsspec transaction whose temporary file is in the
    system's temp folder; when that is another file system, the "rename" is a copy, and a
    kill during it leaves a truncated or empty ``last.ckpt``. :class:`DistillationModule`
    installs this plugin at fit start when the strategy uses the plain ``TorchCheckpointIO``
    (pass ``Trainer(plugins=[AtomicCheckpointIO()])`` to set it yourself). Remote paths
    (``s3://``, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Make ``trainer`` write its checkpoints with :class:`AtomicCheckpointIO` when its
    strategy uses Lightning's plain ``TorchCheckpointIO`` (other plugins are left alone)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def state_digest(state: Any) -> str:
    """sha256 over every tensor in a (nested) checkpoint: its position, dtype, shape and
    bytes. Other values are left out, so what loading adds or migrates (versions,
    hyper-parameters) does not change it."""
    digest = hashlib.sha256()
    _hash_into(digest, state, "")
    return digest.hexdigest()


def _hash_into(digest: Any, value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        digest.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _hash_into(digest, value[key], f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _hash_into(digest, item, f"{where}/{i}")


def save_safetensors_atomic(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``state`` as safetensors, atomically."""
    tensors = {k: v.contiguous() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


AUTO_MONITOR = "auto"


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the run's best-checkpoint record across a resume that
    writes to another folder (a new logger version).

    ``monitor="auto"``: the metric and mode are the module's ``selection_metric`` (for a
    :class:`~visdistill.DistillationModule`: ``val/acc``, higher is better, for a classifier
    student on labelled data, else ``val/loss``, lower is better), resolved when the trainer
    sets up, before a checkpoint is restored. Other modules: ``val/acc``, max.

    Lightning restores ``best_model_score`` only when the checkpoint folder is unchanged, so
    after such a resume the first validation became the "best", and ``test_after_fit``
    tested the best since the resume. Here the score and the best checkpoints (those still
    on disk) are restored too; a better score later writes ``best.ckpt`` in the new folder,
    and the old folder's file is left where it is.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.monitor == AUTO_MONITOR:
            select = getattr(pl_module, "selection_metric", None)
            monitor, mode = select(trainer.datamodule) if select else ("val/acc", "max")
            self.monitor, self.mode = monitor, mode
            self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
        super().setup(trainer, pl_module, stage)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written with either class restore into both.
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__) :]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        best = state_dict.get("best_model_path")
        if not moved or not best or not Path(best).is_file():
            return
        self.best_model_score = state_dict["best_model_score"]
        self.best_k_models = {
            path: score
            for path, score in state_dict.get("best_k_models", {}).items()
            if Path(path).is_file()
        }
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
