"""Export a trained student as a plain timm model: ``model.safetensors`` + ``config.json``.

The folder loads without visdistill::

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    # or
    timm.create_model(arch, pretrained=True, num_classes=K, **model_args,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors"))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoints import atomic_write, read_checkpoint_file, save_safetensors_atomic
from .errors import CheckpointError, format_keys
from .models import Backbone, ModelConfig, fixed_input_size

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A visdistill Lightning checkpoint, loaded with ``weights_only=True``."""
    path = Path(path)
    ckpt = read_checkpoint_file(path, "export another checkpoint of the run")
    if "state_dict" not in ckpt or "student" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(
            f"{path} is not a visdistill Lightning checkpoint (no student hyper-parameters); "
            "`visdistill export` takes the .ckpt files that `visdistill fit` writes"
        )
    from .resume import digest_matches

    if not digest_matches(ckpt):
        raise CheckpointError(
            f"{path} is corrupted: its tensors do not match the sha256 stored when it was "
            "written (bit flips in storage or a damaged copy). Export another checkpoint"
        )
    return ckpt


def export_student(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    input_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the student of a fit checkpoint as ``out_dir/model.safetensors`` + ``config.json``.

    Args:
        checkpoint: a ``.ckpt`` written by ``visdistill fit``.
        out_dir: destination folder (created).
        dtype: ``float32``, ``float16`` (half the size) or ``bfloat16``.
        input_size: recorded input side when the student has no fixed size; default
            the data module's ``image_size`` stored in the checkpoint.
        overwrite: write into a non-empty ``out_dir`` (replacing its ``model.safetensors``
            and ``config.json``, nothing else); refused by default.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    check_export_destination(out, overwrite)
    ckpt = read_lightning_checkpoint(checkpoint)
    config = ModelConfig(**ckpt["hyper_parameters"]["student"])
    prefix = "student.model."
    state = {
        k[len(prefix) :]: v.to(_DTYPES[dtype]) if v.is_floating_point() else v
        for k, v in ckpt["state_dict"].items()
        if k.startswith(prefix)
    }
    # Build the architecture (no weights) to validate the keys and read its metadata.
    student = Backbone.from_config(
        ModelConfig(**{**config.__dict__, "checkpoint": None, "pretrained": False})
    )
    missing = set(student.model.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"{checkpoint} lacks student weights: {sorted(missing)[:5]}")
    _check_finite_weights(checkpoint, ckpt, state, dtype)
    spec = student.input_spec
    size = spec.size
    if size is None:
        side = input_size or ckpt.get("datamodule_hyper_parameters", {}).get("image_size")
        if side is None:
            raise CheckpointError("the student has no fixed input size; pass --input-size")
        size = (side, side)
    pretrained_cfg = {
        "input_size": [spec.in_chans, *size],
        "fixed_input_size": fixed_input_size(student.model, student.arch_kwargs) is not None,
        "interpolation": spec.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "num_classes": student.num_classes,
        "first_conv": student.model.pretrained_cfg.get("first_conv"),
        "classifier": student.model.pretrained_cfg.get("classifier"),
        "license": "apache-2.0",
    }
    model_args = dict(student.arch_kwargs)
    if config.in_chans != 3:
        model_args["in_chans"] = config.in_chans
    timm_config = {
        "architecture": student.arch,
        "num_classes": student.num_classes,
        "num_features": student.num_features,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, out / "model.safetensors", metadata={"format": "pt"})
    text = json.dumps(timm_config, indent=2)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    return out


def check_export_destination(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder without ``overwrite`` (an earlier export, the
    zoo's shipped weights, ...)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        raise CheckpointError(
            f"--out {out} is not empty ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
            "pass --overwrite to replace its model.safetensors and config.json (nothing else "
            "is touched), or choose a new folder"
        )


def _check_finite_weights(
    source: str | os.PathLike, ckpt: dict[str, Any], state: dict[str, torch.Tensor], dtype: str
) -> None:
    """Refuse NaN/inf student weights, naming the tensors: in the checkpoint, or created by
    the cast to ``dtype`` (a float16 overflow)."""
    prefix = "student.model."
    original = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    bad = [k for k, v in original.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"{source} has non-finite (NaN/inf) student weights in {format_keys(bad, 5)}; "
            "export an earlier checkpoint of the run (the training diverged)"
        )
    cast = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if cast:
        raise CheckpointError(
            f"{source}: {format_keys(cast, 5)} exceed the range of {dtype}; export with "
            "--dtype float32 or bfloat16"
        )
