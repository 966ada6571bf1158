"""Teacher checkpoints for the mmdet integration, on torch >= 2.6 (weights-only loading).

A plain state dict (``{"state_dict": {...}}`` as mmdet's model zoo ships, a flat ``{name: tensor}``
or ``.safetensors``) loads with ``weights_only=True``. A checkpoint written by mmengine's Runner
(``epoch_N.pth``) also pickles its message hub, optimizer and scheduler state; torch >= 2.6 refuses
it under ``weights_only=True``, so it is refused here with the two ways out: trusted loading
(``teacher_trusted=True``), or a one-time conversion to safetensors (:func:`convert_checkpoint`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ...checkpoints import (
    atomic_write,
    clean_state_dict,
    load_state_dict_file,
    load_weights_into,
    save_safetensors_atomic,
)
from ...errors import CheckpointError


def read_state_dict(path: str | os.PathLike, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` weights of ``path``.

    Args:
        path: ``.safetensors``, a torch-saved state dict, or (with ``trusted``) an mmengine Runner
            checkpoint; ``{"state_dict": ...}`` is unwrapped.
        trusted: unpickle arbitrary objects (``weights_only=False``): only for files you made or trust.
    """
    path = Path(path)
    if not trusted or path.suffix == ".safetensors":
        try:
            return load_state_dict_file(path)
        except CheckpointError as e:
            if isinstance(e.__cause__, pickle.UnpicklingError):
                raise CheckpointError(
                    f"{path} is not a plain state dict: it pickles other objects (an mmengine Runner "
                    "checkpoint keeps its message hub, optimizer and scheduler state), which torch >= 2.6 "
                    "refuses to load with weights_only=True. If you trust the file, either convert it "
                    "once: `python -m visdistill.integrations.mmdet convert "
                    f"{path} {path.with_suffix('.safetensors')} --trusted` and point teacher_checkpoint "
                    "at the result, or set teacher_trusted=True in the model config."
                ) from e.__cause__
            raise
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (resolved: {path.resolve()})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    return clean_state_dict(state, source=str(path))


def load_detector_weights(
    model: nn.Module, path: str | os.PathLike, trusted: bool = False, prefix: str = ""
) -> None:
    """Strictly load ``path`` into ``model``; missing/unexpected keys and wrong shapes raise one
    :class:`~visdistill.errors.CheckpointError` listing all of them.

    Args:
        prefix: keep only keys starting with it, stripped (``"student."`` reads the student out
            of a distilled checkpoint).
    """
    state = read_state_dict(path, trusted)
    if prefix:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not picked:
            raise CheckpointError(f"{path} has no keys starting with {prefix!r}")
        state = picked
    load_weights_into(model, state, source=str(path))


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, trusted: bool = False, prefix: str = ""
) -> Path:
    """Write the weights of ``src`` (optionally only the ``prefix`` sub-model, e.g. ``"student."`` of a
    distilled Runner checkpoint) as ``dst`` (``.safetensors``, or a torch state dict for ``.pth``),
    which then loads weights-only everywhere. Returns ``dst``."""
    state = read_state_dict(src, trusted)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{src} has no keys starting with {prefix!r}")
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        # safetensors refuses tensors that share memory; a detector's state dict has none besides
        # aliases, which clone() separates.
        return save_safetensors_atomic({k: v.clone() for k, v in state.items()}, dst)
    return atomic_write(dst, lambda tmp: torch.save({"state_dict": state}, tmp))
