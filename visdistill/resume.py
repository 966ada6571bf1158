"""What a :class:`~visdistill.DistillationModule` adds to and checks in Lightning checkpoints.

Lightning 2.6 saves the module's ``state_dict`` (student, terms' parameters and buffers:
UNIC running statistics, ND class means, MST router, MEAL V2 discriminator, the
non-finite counter), the optimizers, schedulers, loop progress and the training loader's
``state_dict`` (:class:`~visdistill.data.resumable.ResumableDataLoader`: epoch and
position). It does not save random-number generator states; :func:`on_save` adds them
(CPU, CUDA, Python, NumPy) so dropout, teacher dropping and unreplayed augmentations
continue the uninterrupted run's stream.

It also drops the frozen teachers' weights (``teachers.*``) when every teacher can be
rebuilt from its config (a ``checkpoint`` file, ``pretrained`` weights or a ``zoo:``
entry), keeping a sha256 of them instead; :func:`on_load` puts the rebuilt teachers'
weights back after checking that sha256, so a changed teacher file is an error, not a
silently different run. Randomly initialised teachers are kept in the checkpoint.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoints import read_checkpoint_file, state_digest
from .errors import CheckpointError, format_keys
from .lightning_private import fit_loop_checkpoint_state
from .teachers import teacher_fingerprint

KEY = "visdistill"
DIGEST = "state_sha256"
TEACHER_PREFIX = "teachers."


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a ``ckpt_path`` that is missing, unreadable or carries pickled code, naming it
    (Lightning would raise from deep inside ``torch.load``). Reads lazily (``mmap``)."""
    read_checkpoint_file(
        path,
        "give the .ckpt of a `visdistill fit` run, e.g. runs/<name>/checkpoints/last.ckpt, or "
        "`last` (--ckpt_path last takes the newest usable last.ckpt; best.ckpt is also one)",
        mmap=True,
    )


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (empty, unreadable, not a Lightning checkpoint,
    contents not matching the digest stored at save time), or ``None`` when it can."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes): its write was interrupted"
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a checkpoint, pickled code
        return f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "not a Lightning checkpoint (no state_dict)"
    if not digest_matches(ckpt):
        return "corrupted: its tensors do not match the sha256 stored when it was written"
    return None


def find_last_checkpoint(trainer: Any) -> str | None:
    """The newest usable ``last*.ckpt`` of this run: in the folders of the trainer's
    ``ModelCheckpoint`` callbacks and, when the logger numbers its versions
    (``version_0``, ``version_1``, ...), in every version's ``checkpoints/``. Lightning's
    own ``ckpt_path="last"`` looks only in the *new* version's folder and starts from
    scratch. Newer files that cannot be used (see :func:`checkpoint_problem`) are skipped
    with a warning naming each and why; when none is usable, an error lists them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = {Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.add(Path(callback.dirpath))
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        folders.update(Path(logger.save_dir, logger.name or "").glob("*/checkpoints"))
    found = {p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file()}
    skipped = []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                warnings.warn(
                    f"--ckpt_path last: resuming from {path}; skipped newer unusable "
                    f"checkpoint(s): {'; '.join(skipped)}",
                    stacklevel=2,
                )
            return str(path)
        skipped.append(f"{path} ({problem})")
    if skipped:
        raise CheckpointError(
            f"--ckpt_path last: no usable last.ckpt: {'; '.join(skipped)}. Resume from another "
            "checkpoint with --ckpt_path PATH (best.ckpt is one), or start a new run"
        )
    return None


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def teachers_rebuildable(teacher_configs: list[dict[str, Any]]) -> bool:
    """Whether every teacher's weights come from somewhere other than the checkpoint."""
    return bool(teacher_configs) and all(
        c.get("checkpoint") or c.get("pretrained") or str(c.get("name", "")).startswith("zoo:")
        for c in teacher_configs
    )


def on_save(module: Any, checkpoint: dict[str, Any]) -> None:
    """Add RNG states and the terms' names; drop rebuildable teachers' weights."""
    extra: dict[str, Any] = {
        "rng": collect_rng_states(),
        "terms": [type(t).__name__ for t in module.terms],
    }
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    if datamodule is not None:
        extra["datamodule"] = type(datamodule).__name__
    if module.teachers is not None and teachers_rebuildable(module.hparams["teachers"]):
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        extra["teachers_sha256"] = _fingerprint(module)
    checkpoint[KEY] = extra
    _mark_finished_epoch(checkpoint)
    # Last: a digest of every tensor written (weights, optimizer, RNG), checked at load. The
    # keys hashed are recorded: what other hooks add after this one is not covered. Under
    # DDP only global rank 0 writes the file, so only it hashes.
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.is_global_zero:
        keys = sorted(str(k) for k in checkpoint)
        extra[DIGEST] = {"sha256": state_digest({k: checkpoint[k] for k in keys}), "keys": keys}


# Data-module settings that do not change what the model sees.
_DATA_SETTINGS_IGNORED = ("num_workers", "_instantiator", "_class_path")


def warn_if_other_data(module: Any, checkpoint: dict[str, Any]) -> None:
    """Warn when a fit resumes on another data module, or the same one with other settings
    (data, subset, split, augmentation, image size, seed ...), naming the differences. Not
    an error: fine-tuning a checkpoint on other data is legitimate, but doing it by
    accident silently mixes two runs."""
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return
    differences = []
    saved_class = checkpoint.get(KEY, {}).get("datamodule")
    if saved_class is not None and saved_class != type(datamodule).__name__:
        differences.append(f"data module {saved_class} -> {type(datamodule).__name__}")
    saved = checkpoint.get("datamodule_hyper_parameters")
    now = dict(getattr(datamodule, "hparams", {}) or {})
    if saved is not None and not differences:
        for key in sorted(set(saved) | set(now)):
            if key in _DATA_SETTINGS_IGNORED or saved.get(key) == now.get(key):
                continue
            differences.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    if differences:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"resuming on other data than the checkpoint was trained on ({'; '.join(differences)}). "
            "If this is not a deliberate fine-tune, resume with the run's own data config",
            category=UserWarning,
        )


def _mark_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written after the epoch's last batch under ``limit_train_batches``:
    the training loader handed out fewer batches than its length, so on resume it would
    skip that many batches of the *next* epoch. Record its epoch as finished instead (what
    a full epoch records by itself)."""
    last_batch, states = fit_loop_checkpoint_state(checkpoint)
    if not last_batch:
        return
    for state in states:
        if isinstance(state, dict) and {"batches", "num_batches"} <= set(state):
            state["batches"] = state["num_batches"]


def digest_matches(checkpoint: dict[str, Any]) -> bool:
    """Whether ``checkpoint``'s tensors are the ones :func:`on_save` hashed (``True`` for
    checkpoints without a digest: older ones, or not written by visdistill)."""
    extra = checkpoint.get(KEY)
    if not isinstance(extra, dict) or not isinstance(extra.get(DIGEST), dict):
        return True
    saved = extra[DIGEST]
    without = {k: v for k, v in extra.items() if k != DIGEST}
    hashed = {k: without if k == KEY else checkpoint.get(k) for k in saved.get("keys", [])}
    return state_digest(hashed) == saved.get("sha256")


def on_load(module: Any, checkpoint: dict[str, Any], source: str | None = None) -> None:
    """Check that ``checkpoint`` was written by this configuration and restore what
    :func:`on_save` removed; restore the RNG states when ``restore_rng``."""
    source = source or "the checkpoint"
    if not digest_matches(checkpoint):
        raise CheckpointError(
            f"{source} is corrupted: its tensors do not match the sha256 stored when it was "
            "written (bit flips in storage or a damaged copy). Resume from another checkpoint "
            "(an older last.ckpt, or best.ckpt)"
        )
    extra = checkpoint.get(KEY, {})
    state = checkpoint.get("state_dict", {})
    saved_teachers = checkpoint.get("hyper_parameters", {}).get("teachers")
    if saved_teachers is not None and module.teachers is not None:
        _check_same_teachers(saved_teachers, module.hparams["teachers"], source)
    if "teachers_sha256" in extra and module.teachers is not None:
        if extra["teachers_sha256"] != _fingerprint(module):
            raise CheckpointError(
                f"{source} was trained with other teacher weights than the ones its teacher "
                f"configs load now ({_teacher_names(module)}): a teacher file or zoo entry "
                "changed since. Restore the original teacher files to resume"
            )
        for key, value in module.teachers.state_dict().items():
            state.setdefault(TEACHER_PREFIX + key, value)
    _check_fits(module, checkpoint, extra, source)
    _warn_changed_term_settings(module, checkpoint, source)


def _warn_changed_term_settings(module: Any, checkpoint: dict[str, Any], source: str) -> None:
    """Same terms (``_check_fits`` passed), other settings: allowed (a new temperature for
    the rest of a fit can be deliberate), but said, never silent."""
    saved = checkpoint.get("hyper_parameters", {}).get("terms")
    now = module.hparams.get("terms")
    if not saved or not now or len(saved) != len(now):
        return
    changes = []
    for i, (old, new) in enumerate(zip(saved, now, strict=True)):
        a, b = old.get("init_args", {}), new.get("init_args", {})
        name = new.get("class_path", "?").rpartition(".")[2]
        changes += [
            f"terms[{i}] {name}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
    if changes:
        warnings.warn(
            f"{source} was trained with other term settings; going on with the config's: "
            + "; ".join(changes),
            stacklevel=2,
        )


def restore_rng(checkpoint: dict[str, Any]) -> None:
    if "rng" in checkpoint.get(KEY, {}):
        restore_rng_states(checkpoint[KEY]["rng"])


def _check_fits(module: Any, checkpoint: dict[str, Any], extra: dict, source: str) -> None:
    state: dict[str, Tensor] = checkpoint.get("state_dict", {})
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], Tensor) and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    differences = []
    saved = checkpoint.get("hyper_parameters", {})
    now = dict(module.hparams)
    for field in ("student", "teachers"):
        if field in saved and saved[field] != now.get(field):
            differences.append(
                f"{field}: checkpoint {_names(saved[field])}, config {_names(now[field])}"
            )
    terms = [type(t).__name__ for t in module.terms]
    if "terms" in extra and extra["terms"] != terms:
        differences.append(f"terms: checkpoint {extra['terms']}, config {terms}")
    problems = [f"missing keys: {format_keys(missing)}"] if missing else []
    problems += [f"unexpected keys: {format_keys(unexpected)}"] if unexpected else []
    problems += [f"shape mismatches: {format_keys(shapes, 5)}"] if shapes else []
    raise CheckpointError(
        f"{source} was written by another configuration"
        + (f" ({'; '.join(differences)})" if differences else "")
        + ": "
        + "; ".join(problems)
        + ". Resume with the config the checkpoint was trained with (its hyper-parameters are "
        "in the checkpoint and in the run's config.yaml), or start a new run"
    )


def _check_same_teachers(saved: list[Any], now: list[Any], source: str) -> None:
    """Other teachers (by name) than the checkpoint's: say so, before the weight hash would
    only say "a teacher file changed". (A moved teacher file with the same weights is fine.)"""
    names_saved, names_now = _names(saved), _names(now)
    if names_saved != names_now:
        raise CheckpointError(
            f"{source}: the checkpoint's teachers are {names_saved}, the config's {names_now}. "
            "Resume with the teachers it was trained with (model.teachers), or start a new run"
        )


def _names(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name"))
    if isinstance(value, list):
        return "[" + ", ".join(_names(v) for v in value) + "]"
    return repr(value)


def _teacher_names(module: Any) -> str:
    return ", ".join(t.name for t in module.teachers)


def _fingerprint(module: Any) -> str:
    # Teachers are frozen: hash them once per module.
    if getattr(module, "_teachers_sha256", None) is None:
        module._teachers_sha256 = teacher_fingerprint(list(module.teachers))
    return module._teachers_sha256
