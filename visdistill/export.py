"""Export a trained student: a timm model folder, an ONNX graph, or both on the Hugging Face Hub.

``format="timm"`` writes ``model.safetensors`` + ``config.json`` (timm's own layout, written
by ``timm.models.save_config_for_hf``). The folder loads without visdistill::

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    # or
    timm.create_model(arch, pretrained=True, num_classes=K, **model_args,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors"))

``format="onnx"`` writes ``model.onnx`` (dynamic batch axis) + the same ``config.json`` with
an ``onnx`` section, and keeps the file only if onnxruntime reproduces PyTorch's outputs on a
random batch. ``push_to_hub`` uploads the timm folder with ``timm.models.push_to_hf_hub``.

``with_adaptors=True`` (a checkpoint trained with :class:`~visdistill.AdaptorHeads`) also
writes the adaptor heads and each teacher's normaliser statistics next to the timm folder
(``adaptors.safetensors`` + ``adaptors.json``);
:meth:`visdistill.AgglomerativeStudent.from_export` loads the three files as one module that
emits each teacher's features.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .checkpoints import atomic_write, read_checkpoint_file, save_safetensors_atomic
from .errors import CheckpointError, ConfigError, VisdistillError, format_keys
from .models import Backbone, ModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("timm", "onnx")
# The weights file each format writes next to config.json.
WEIGHTS_FILE = {"timm": "model.safetensors", "onnx": "model.onnx"}
# pretrained_cfg fields that describe the weights timm published for the architecture, not
# the distilled student's (a digits student is not "augreg_in21k_ft_in1k").
_SOURCE_WEIGHT_FIELDS = ("tag", "description", "origin_url", "paper_name", "paper_ids", "notes")
ONNX_INPUT = "input"
# Batch sizes of the onnxruntime check: neither is the traced batch (2), so the check also
# proves that the batch axis is dynamic.
_CHECK_BATCHES = (1, 3)
# Opset of the TorchScript fallback (the dynamo exporter picks its own).
_TORCHSCRIPT_OPSET = 17


class ExportError(VisdistillError, RuntimeError):
    """An export that would not be faithful (ONNX differs from PyTorch, no exporter could
    trace the student) or could not be uploaded. Nothing unchecked is left in ``out_dir``."""


@dataclass(frozen=True)
class OnnxCheck:
    """How an ONNX file was produced and how closely onnxruntime reproduces PyTorch.

    Attributes:
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, the default) or
            ``"torchscript"`` (the fallback when the dynamo exporter fails).
        fallback_reason: why the dynamo exporter failed, when it did.
        opset: the graph's ONNX opset.
        max_abs_diff: largest ``|onnxruntime - PyTorch|`` over the checked outputs.
        atol: the largest difference allowed.
        batch_sizes: batch sizes of the random ``N(0, 1)`` inputs that were checked.
        export_seconds, check_seconds: wall time of the export and of the check.
    """

    exporter: str
    fallback_reason: str | None
    opset: int
    max_abs_diff: float
    atol: float
    batch_sizes: tuple[int, ...]
    export_seconds: float
    check_seconds: float


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
    format: Literal["timm", "onnx"] = "timm",
    push_to_hub: str | None = None,
    onnx_atol: float = 1e-4,
    with_adaptors: bool = False,
) -> Path:
    """Write the student of a fit checkpoint as a timm folder or an ONNX graph.

    ``timm``: ``out_dir/model.safetensors`` + ``config.json`` (``timm.create_model(
    "local-dir:<out_dir>", pretrained=True)`` loads it). ``onnx``: ``out_dir/model.onnx``
    + ``config.json``; the graph maps a preprocessed ``(B, C, H, W)`` float32 batch (resized
    to ``pretrained_cfg.input_size``, scaled to ``[0, 1]``, normalised with its ``mean`` and
    ``std``) to ``(B, K)`` logits, or ``(B, D)`` features for a headless student, with ``B``
    free. It is kept only if onnxruntime gives PyTorch's outputs on random batches to within
    ``onnx_atol``; the measured difference is recorded in ``config.json``.

    Args:
        checkpoint: a ``.ckpt`` written by ``visdistill fit``.
        out_dir: destination folder (created).
        dtype: ``float32``, ``float16`` (half the size) or ``bfloat16``; ONNX export takes
            ``float32`` only.
        input_size: recorded input side when the student has no fixed size; default
            the data module's ``image_size`` stored in the checkpoint.
        overwrite: write into a non-empty ``out_dir`` (replacing its weights file and
            ``config.json``, and the adaptor files with ``with_adaptors``, nothing else);
            refused by default.
        format: ``timm`` (safetensors weights) or ``onnx`` (a graph checked with
            onnxruntime against PyTorch; needs ``pip install 'visdistill[onnx]'``).
        push_to_hub: a Hugging Face Hub repo id (``user/name``): after writing ``out_dir``,
            upload it there with ``timm.models.push_to_hf_hub`` (timm format only; needs
            the network and a token with write access: ``hf auth login`` or ``HF_TOKEN``).
        onnx_atol: largest ``|onnxruntime - PyTorch|`` output difference an ONNX export may
            have.
        with_adaptors: also write the checkpoint's AdaptorHeads (per teacher, the summary
            and spatial heads and the normalisers' statistics). ``timm``:
            ``adaptors.safetensors`` + ``adaptors.json`` next to the timm folder, for
            ``visdistill.AgglomerativeStudent.from_export(out_dir)``. ``onnx``:
            ``agglomerative.onnx`` (student and heads in one graph, checked like
            ``model.onnx``; outputs in each teacher's space) + ``adaptors.json``.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        _check_onnx_request(dtype, push_to_hub, onnx_atol)
    if with_adaptors:
        _check_adaptors_request(push_to_hub)
    if push_to_hub is not None:
        check_hub_target(push_to_hub)
    out = Path(out_dir)
    check_export_destination(out, overwrite, format, with_adaptors)
    ckpt = read_lightning_checkpoint(checkpoint)
    config = ModelConfig(**ckpt["hyper_parameters"]["student"])
    prefix = "student.model."
    state = {
        k[len(prefix) :]: v.to(_DTYPES[dtype]) if v.is_floating_point() else v
        for k, v in ckpt["state_dict"].items()
        if k.startswith(prefix)
    }
    # Rebuild the architecture to validate the keys, read its metadata and run it; for ONNX
    # with timm's export-friendly layer variants (same weights, traceable ops).
    from timm.layers import set_layer_config

    with set_layer_config(exportable=format == "onnx"):
        student = Backbone.from_config(
            ModelConfig(**{**config.__dict__, "checkpoint": None, "pretrained": False})
        )
    missing = set(student.model.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"{checkpoint} lacks student weights: {sorted(missing)[:5]}")
    _check_finite_weights(checkpoint, ckpt, state, dtype)
    size = student.input_spec.size
    if size is None:
        side = input_size or ckpt.get("datamodule_hyper_parameters", {}).get("image_size")
        if side is None:
            raise CheckpointError("the student has no fixed input size; pass --input_size")
        size = (side, side)
    model = student.model.to(_DTYPES[dtype]).eval()
    model.load_state_dict(state)
    model_config, data_config = _hf_config(student, size)
    adaptors = None
    if with_adaptors:  # refusals come before anything is written
        from .agglomerative_student import adaptors_from_checkpoint

        adaptors = adaptors_from_checkpoint(
            checkpoint, ckpt, student, size, _DTYPES[dtype], input_size
        )
    out.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        output = "features" if student.headless else "logits"
        generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone
        example = torch.randn(2, student.input_spec.in_chans, *size, generator=generator)
        check = write_onnx(model, out / WEIGHTS_FILE["onnx"], example, output, onnx_atol)
        with torch.no_grad():
            output_shape = model(example).shape[1:]
        model_config["onnx"] = _onnx_section(check, example, output, output_shape)
    else:
        save_safetensors_atomic(state, out / WEIGHTS_FILE["timm"], metadata={"format": "pt"})
    _write_config(model, out / "config.json", model_config, data_config)
    if adaptors is not None and format == "onnx":
        adaptors.write_onnx(out, model, example, onnx_atol)
    elif adaptors is not None:
        adaptors.write(out)
    if push_to_hub is not None:
        _push(model, push_to_hub, model_config, data_config, out)
    return out


def check_export_destination(
    out: Path, overwrite: bool, format: str = "timm", with_adaptors: bool = False
) -> None:
    """Refuse a file, or a non-empty folder without ``overwrite`` (an earlier export, the
    zoo's shipped weights, ...). With ``overwrite``, refuse a folder holding the other
    format's weights file (the new ``config.json`` would not describe it), and, without
    ``with_adaptors``, one holding adaptor heads (they would not match the new student)."""
    from .agglomerative_student import ADAPTOR_FILES

    written = (
        f"{WEIGHTS_FILE[format]}, config.json, {' and '.join(ADAPTOR_FILES[format])}"
        if with_adaptors
        else f"{WEIGHTS_FILE[format]} and config.json"
    )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        held = sorted(p.name for p in out.iterdir())
        raise CheckpointError(
            f"--out {out} is not empty ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
            f"pass --overwrite to replace its {written} (nothing else is touched), or choose a "
            "new folder"
        )
    other = [WEIGHTS_FILE[f] for f in FORMATS if f != format and (out / WEIGHTS_FILE[f]).exists()]
    if other:
        raise CheckpointError(
            f"--out {out} holds {other[0]} from an earlier export; --overwrite would replace "
            f"only its {written}, leaving a config.json that may not describe {other[0]}. "
            "Export each format to its own folder"
        )
    adaptor_files = sorted({n for names in ADAPTOR_FILES.values() for n in names})
    stale = [n for n in adaptor_files if (out / n).exists()]
    if stale and not with_adaptors:
        raise CheckpointError(
            f"--out {out} holds {stale[0]} from an earlier export with adaptor heads; "
            f"--overwrite without --with_adaptors would replace only its {written}, leaving "
            "heads trained with another student. Pass --with_adaptors too, or choose a new "
            "folder"
        )


def check_hub_target(repo_id: str) -> None:
    """Refuse, before any work, a push that cannot happen: a malformed repo id, offline
    mode (``HF_HUB_OFFLINE``), or no Hugging Face token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(
            f"--push_to_hub {repo_id!r} is not a Hugging Face repo id ({e}); use 'user/name' "
            "or 'organisation/name'"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it, or export "
            "without --push_to_hub and upload the folder later (`hf upload REPO OUT_DIR`)"
        )
    try:
        token = get_token()
    except Exception as e:  # e.g. a failed OIDC exchange when HF_OIDC_RESOURCE is set
        raise ConfigError(f"--push_to_hub: no usable Hugging Face token ({e})") from e
    if token is None:
        raise ConfigError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login` "
            "or set HF_TOKEN, or export without --push_to_hub"
        )


def write_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: Tensor,
    output_name: str | Sequence[str] = "logits",
    atol: float = 1e-4,
) -> OnnxCheck:
    """Export ``model`` (eval mode, float32) to ONNX at ``path`` and check it with onnxruntime.

    The graph has one input ``"input"`` shaped like ``example`` ``(B, ...)`` with a dynamic
    batch axis ``B``, and one output ``output_name`` (or, for a model that returns a tuple
    of ``(B, ...)`` tensors, one output per name, in order). ``torch.onnx.export(dynamo=True)`` is
    tried first; when it fails (``torch.export`` cannot trace every model) the TorchScript
    exporter is used and the reason recorded. The exported graph is run with onnxruntime on
    random ``N(0, 1)`` batches of sizes 1 and 3 and compared with ``model``: the file is
    moved into place only if no output differs by more than ``atol`` (else
    :class:`ExportError`, and ``path`` is left as it was).
    """
    model = model.eval()
    result: list[OnnxCheck] = []

    def write(tmp: str) -> None:
        start = time.perf_counter()
        exporter, reason = _export_onnx(model, example, tmp, output_name)
        seconds = time.perf_counter() - start
        result.append(
            _check_onnx(model, tmp, example, output_name, exporter, reason, atol, seconds)
        )

    atomic_write(path, write)
    return result[0]


def _output_names(output_name: str | Sequence[str]) -> list[str]:
    return [output_name] if isinstance(output_name, str) else list(output_name)


def _check_onnx_request(dtype: str, push_to_hub: str | None, atol: float) -> None:
    if dtype != "float32":
        raise ConfigError(
            f"ONNX export writes float32 graphs (onnxruntime's CPU kernels, which check the "
            f"export, lack most {dtype} ops), got --dtype {dtype}. Export float32 and convert "
            "the graph afterwards (e.g. onnxconverter-common's float16 converter), or use "
            f"--format timm --dtype {dtype}"
        )
    if push_to_hub is not None:
        raise ConfigError(
            "--push_to_hub uploads the timm folder (model.safetensors + config.json), not an "
            "ONNX graph; push with --format timm, or upload the ONNX folder with `hf upload`"
        )
    if not atol > 0:
        raise ConfigError(f"onnx_atol must be positive, got {atol}")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install 'visdistill[onnx]'")


def _check_adaptors_request(push_to_hub: str | None) -> None:
    if push_to_hub is not None:
        raise ConfigError(
            "--push_to_hub uploads timm's two files (model.safetensors + config.json), not the "
            "adaptor heads; export without --push_to_hub, then upload the whole folder with "
            "`hf upload REPO OUT_DIR`"
        )


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _hf_config(student: Backbone, size: tuple[int, int]) -> tuple[dict, dict]:
    """``(model_config, data_config)`` for timm's config writer: the student's own input
    spec at ``size``, and its pooled width as ``num_features`` (the width of a headless
    student's output)."""
    spec = student.input_spec
    data_config = {
        "input_size": (spec.in_chans, *size),
        "interpolation": spec.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(spec.mean),
        "std": tuple(spec.std),
    }
    model = student.model
    model.pretrained_cfg = {
        k: v for k, v in model.pretrained_cfg.items() if k not in _SOURCE_WEIGHT_FIELDS
    }
    return {"num_features": student.num_features}, data_config


def _write_config(model: nn.Module, path: Path, model_config: dict, data_config: dict) -> None:
    from timm.models._hub import save_config_for_hf

    atomic_write(
        path,
        lambda tmp: save_config_for_hf(
            model, tmp, model_config=dict(model_config), data_config=data_config
        ),
    )


def _push(model: nn.Module, repo_id: str, model_config: dict, data_config: dict, out: Path) -> None:
    from timm.models import push_to_hf_hub

    try:
        push_to_hf_hub(
            model,
            repo_id,
            commit_message="Add a student distilled with visdistill",
            model_config=dict(model_config),
            data_config=data_config,
            safe_serialization=True,
        )
    except Exception as e:  # network, permissions, quota: all surface from huggingface_hub
        raise ExportError(
            f"{out} is written, but uploading it to the Hugging Face Hub repo {repo_id!r} "
            f"failed: {_first_line(e)}. Upload the folder later with `hf upload {repo_id} {out}`"
        ) from e


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``e``, without terminal colours."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _export_onnx(
    model: nn.Module, example: Tensor, path: str, output_name: str | Sequence[str]
) -> tuple[str, str | None]:
    """Write the graph to ``path``; ``(exporter, why the dynamo exporter failed or None)``."""
    outputs = _output_names(output_name)
    names = {"input_names": [ONNX_INPUT], "output_names": outputs}
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            **names,
        )
        # One self-contained file: external data would be named after the temporary file.
        program.save(path, external_data=False)
        return "dynamo", None
    except Exception as e:  # torch.export cannot trace every model: try TorchScript tracing
        reason = _first_line(e)
    warnings.warn(
        f"the dynamo ONNX exporter failed ({reason}); exporting with the TorchScript exporter "
        "instead (its graph is checked with onnxruntime the same way)",
        stacklevel=5,  # export_student / write_onnx's caller
    )
    try:
        with warnings.catch_warnings():
            # We fall back to it on purpose; its deprecation notice has nothing to act on.
            warnings.filterwarnings(
                "ignore",
                message="You are using the legacy TorchScript-based ONNX export",
                category=DeprecationWarning,
            )
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                opset_version=_TORCHSCRIPT_OPSET,
                dynamic_axes={n: {0: "batch"} for n in (ONNX_INPUT, *outputs)},
                **names,
            )
    except Exception as e:
        raise ExportError(
            f"neither ONNX exporter can export this student (dynamo: {reason}; TorchScript: "
            f"{_first_line(e)}); export it with --format timm"
        ) from e
    return "torchscript", reason


def _check_onnx(
    model: nn.Module,
    path: str,
    example: Tensor,
    output_name: str | Sequence[str],
    exporter: str,
    reason: str | None,
    atol: float,
    export_seconds: float,
) -> OnnxCheck:
    """Run the graph at ``path`` with onnxruntime against ``model``; raise
    :class:`ExportError` if any output differs by more than ``atol`` (or is not finite)."""
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    how = f"{exporter} exporter" + (
        f", after the dynamo exporter failed: {reason}" if reason else ""
    )
    opset = next(
        (
            o.version
            for o in onnx.load(path, load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        ),
        -1,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(
            f"onnxruntime cannot load the exported graph ({how}): {_first_line(e)}; export the "
            "student with --format timm"
        ) from e
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in _CHECK_BATCHES:
        x = torch.randn(batch, *example.shape[1:], generator=generator)
        with torch.no_grad():
            expected = model(x)
        expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
        try:
            got = session.run(_output_names(output_name), {ONNX_INPUT: x.numpy()})
        except Exception as e:
            raise ExportError(
                f"onnxruntime cannot run the exported graph on a batch of {batch} ({how}): "
                f"{_first_line(e)}; export the student with --format timm"
            ) from e
        for g, e in zip(got, expected, strict=True):
            diff = (torch.from_numpy(g) - e).abs().max().item()
            worst = max(worst, diff) if math.isfinite(diff) else math.inf
    if not worst <= atol:
        raise ExportError(
            f"the ONNX graph ({how}) differs from PyTorch by up to {worst:.3g} on random "
            f"batches (allowed: {atol:g}), so it was not written. Export the student with "
            "--format timm, or allow that difference with --onnx_atol"
        )
    return OnnxCheck(
        exporter=exporter,
        fallback_reason=reason,
        opset=opset,
        max_abs_diff=worst,
        atol=atol,
        batch_sizes=_CHECK_BATCHES,
        export_seconds=round(export_seconds, 3),
        check_seconds=round(time.perf_counter() - start, 3),
    )


def _onnx_section(
    check: OnnxCheck, example: Tensor, output: str, output_shape: torch.Size
) -> dict[str, Any]:
    """The ``onnx`` part of ``config.json``: file, tensor names and shapes, and the check
    (without its timings, so that the file depends only on the checkpoint)."""
    record = asdict(check)
    for key in ("export_seconds", "check_seconds"):
        record.pop(key)
    return {
        "file": WEIGHTS_FILE["onnx"],
        "input": {"name": ONNX_INPUT, "shape": ["batch", *example.shape[1:]]},
        "output": {"name": output, "shape": ["batch", *output_shape]},
        "check": record,
    }


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
