"""Reading weights safely: safetensors, or ``torch.load(weights_only=True)``.

Handles the layouts users bring: a plain state dict, a Lightning checkpoint
(``state_dict``), DataParallel (``module.``) and wrapper (``model.``) prefixes, and
visdistill's own Lightning checkpoints (``student.model.``).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, format_keys

# Tried in order, each stripped only when *every* key carries it, so a real
# top-level module called ``model`` is never mangled.
STRIPPABLE_PREFIXES = ("module.", "student.model.", "model.")
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, without unpickling code.

    Returns a flat ``{name: tensor}`` dict with the wrapper prefixes removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (resolved: {path.resolve()}); "
            "check the path, or train/export the model first"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors, which visdistill refuses "
            f"to load (weights_only=True). Re-save it as a plain state dict or safetensors. "
            f"torch said: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # truncated or not a checkpoint at all
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
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
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_safetensors_atomic(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``state`` as safetensors, atomically."""
    tensors = {k: v.contiguous() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
