"""Teacher-output cache: the teachers run once, before training, instead of every step.

Following FKD (Shen & Xing, ECCV 2022), ``build_teacher_cache`` replays ``E`` epochs of the
training set's augmentation (crops and flips are a function of the data seed, epoch and
sample: :class:`~visdistill.data.replay.ReplayCropFlip`) and stores, per epoch, sample and
teacher, the top-``k`` log-probabilities (fp16) with their class indices, the log of the
remaining probability mass, and optionally pooled features. Training with
``DistillationModule(teacher_cache=DIR)`` sees the same crops and reads the targets.

Layout of ``DIR``: ``manifest.json`` plus memory-mapped ``.npy`` arrays. The manifest
records the teachers' fingerprint (names, input specs, weights), the data module and its
hyper-parameters, the augmentation, ``k`` and the number of epochs; a run whose teachers,
data or augmentation differ is refused, naming the differing fields. Without augmentation
(``augment: false``) one epoch is stored and reused for every epoch.

The cache is built in a temporary folder beside ``DIR`` and moved into place at the end. An
existing ``DIR`` is used only when it is empty, or when it holds a cache and ``overwrite`` is
given; then only the cache's own files are replaced, nothing else in the folder is touched.
Opening a cache checks every array's size, shape and values (truncated files, NaN/inf).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .checkpoints import fsync_folder
from .errors import ConfigError
from .loader_pass import run_over_loader
from .models import ModelOutput
from .teachers import teacher_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Every file a cache folder holds; nothing else in a folder is ever deleted or replaced.
_CACHE_FILE = re.compile(r"(manifest\.json|logp\.npy|classes\.npy|rest\.npy|source_index\.npy"
                         r"|pooled\d+\.npy)")  # fmt: skip


def cache_identity(module: Any, datamodule: Any) -> dict[str, Any]:
    """What a cache must agree on with a run: teachers, data, augmentation."""
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    # Loader settings, the test split and LightningCLI's bookkeeping change nothing stored.
    for key in [k for k in hparams if k.startswith("_")] + [
        "batch_size",
        "num_workers",
        "test_subset",
    ]:
        hparams.pop(key, None)
    return {
        "format": FORMAT_VERSION,
        "teachers": teacher_fingerprint(list(module.teachers)),
        "teacher_names": [t.name for t in module.teachers],
        "datamodule": type(datamodule).__qualname__,
        "data_hparams": {k: repr(v) for k, v in sorted(hparams.items())},
        "train_samples": len(datamodule.train_set),
        "augmentation": datamodule.augmentation(),
    }


def check_classifier_teachers(teachers: Any) -> None:
    """Refuse headless teachers (``num_classes: 0``): the cache stores class probabilities."""
    headless = [t.name for t in teachers if t.headless]
    if headless:
        raise ConfigError(
            f"the teacher cache stores the teachers' class probabilities, but teacher(s) "
            f"{', '.join(headless)} are headless (num_classes 0, no classifier); remove "
            "teacher_cache, or cache classifier teachers only"
        )


@torch.no_grad()
def build_teacher_cache(
    module: Any,
    datamodule: Any,
    out: str | os.PathLike,
    epochs: int,
    top_k: int = 10,
    pooled: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Run the module's teachers over ``epochs`` epochs of replayed augmentations.

    Args:
        module: a :class:`DistillationModule` with teachers.
        datamodule: an in-memory data module (replayable augmentation), set up for fit.
        out: cache directory: must not exist, be empty, or (with ``overwrite``) hold a
            cache. Built in a temporary folder beside it, then moved into place.
        epochs: epochs of augmentations to store (>= the runs' ``max_epochs``); ignored
            (1 is stored) when the data module does not augment.
        top_k: classes kept per sample and teacher (the rest share the remaining mass);
            ``k >= num_classes`` stores the exact distribution.
        pooled: also store the teachers' pooled features (fp16), for terms like ND.
        overwrite: replace the cache already in ``out`` (only its own files).
    """
    out = Path(out)
    check_cache_destination(out, overwrite)
    if module.teachers is None:
        raise ConfigError("the teacher cache needs teachers; the model has none")
    check_classifier_teachers(module.teachers)
    if datamodule.train_set is None:
        datamodule.setup("fit")
    if not hasattr(datamodule, "augmentation"):
        raise ConfigError(
            f"{type(datamodule).__name__} has no replayable augmentation; the teacher cache "
            "supports the in-memory data modules (Fashion-MNIST, digits, CIFAR)"
        )
    identity = cache_identity(module, datamodule)
    deterministic = identity["augmentation"] is None
    epochs = 1 if deterministic else int(epochs)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    dataset = datamodule.train_set
    k_cls = module.teachers.num_classes
    k = min(int(top_k), k_cls)
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    # Named by host and pid, so a later build can tell a killed build's leftovers from a
    # build that is still running.
    prefix = f"{_building_prefix(out)}{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix))
    try:
        _build_into(module, dataset, identity, tmp, epochs, k, k_cls, pooled, batch_size, progress)
        _move_into_place(tmp, out, overwrite)
    finally:
        _remove_cache_files(tmp)  # what is left of the temporary folder (only our files)
        if tmp.is_dir() and not any(tmp.iterdir()):
            tmp.rmdir()
    return out


def _building_prefix(out: Path) -> str:
    return f".{out.name}.building-"


def _remove_stale_builds(out: Path) -> None:
    """Remove the temporary folders of builds of ``out`` that were killed (on this host, by
    a process that no longer exists): a cache's worth of arrays otherwise stays on disk.
    Only the cache's own files are removed, then the folder if that empties it."""
    from .run_folder import process_gone

    prefix = _building_prefix(out)
    for folder in out.parent.glob(f"{glob.escape(prefix)}*"):
        parts = folder.name[len(prefix) :].rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue  # named before host/pid were recorded
        if not process_gone(parts[0], int(parts[1])):
            continue  # still building, or another host's build
        _remove_cache_files(folder)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def check_cache_destination(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, a non-empty folder that is not a teacher cache, or
    a cache without ``overwrite``: a cache build never deletes what it did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not _is_cache_folder(out):
        raise ConfigError(
            f"--out {out} is a non-empty folder that is not a visdistill teacher cache (no "
            f"{MANIFEST}); nothing was written. Choose a new or empty folder for the cache"
        )
    if not overwrite:
        raise ConfigError(
            f"--out {out} already holds a teacher cache; pass --overwrite to replace it (only "
            "the cache's own files are replaced), or choose another --out"
        )


def _is_cache_folder(folder: Path) -> bool:
    """A folder with a manifest, or (a replacement interrupted by a crash) cache files only."""
    names = [p.name for p in folder.iterdir()]
    return MANIFEST in names or all(_CACHE_FILE.fullmatch(n) for n in names)


def _remove_cache_files(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and _CACHE_FILE.fullmatch(path.name):
                path.unlink()


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the built cache onto ``out``; into an existing cache folder file by file, the
    old manifest removed first and the new one moved last, so no reader ever sees a manifest
    with another cache's arrays."""
    check_cache_destination(out, overwrite)  # again: the folder may have changed meanwhile
    if not out.exists():
        os.replace(tmp, out)
        return
    (out / MANIFEST).unlink(missing_ok=True)
    _remove_cache_files(out)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(path, out / path.name)
    fsync_folder(out)


def _build_into(
    module: Any,
    dataset: Any,
    identity: dict[str, Any],
    tmp: Path,
    epochs: int,
    k: int,
    k_cls: int,
    pooled: bool,
    batch_size: int,
    progress: bool,
) -> None:
    """Write the arrays and the manifest into ``tmp``."""
    n, m = len(dataset), len(module.teachers)
    deterministic = identity["augmentation"] is None
    arrays = {
        "logp": _memmap(tmp / "logp.npy", (epochs, n, m, k), np.float16),
        "classes": _memmap(tmp / "classes.npy", (epochs, n, m, k), np.int16),
        "rest": _memmap(tmp / "rest.npy", (epochs, n, m), np.float16),
    }
    if pooled:
        for i, teacher in enumerate(module.teachers):
            arrays[f"pooled{i}"] = _memmap(
                tmp / f"pooled{i}.npy", (epochs, n, teacher.num_features), np.float16
            )
    passes = run_over_loader(
        module.teachers,
        _replayed_epochs(dataset, epochs, batch_size),
        lambda teachers, batch: teachers(batch["image"], pooled=pooled),
        device=module.device,
        desc="teacher cache",
        progress=progress,
        total=epochs * n,
    )
    for batch, outs in passes:
        e, start = int(batch["epoch"][0]), int(batch["position"][0])
        rows = slice(start, start + len(batch["position"]))
        logp = torch.stack([o.logits.float().log_softmax(-1) for o in outs], 1)  # (B,M,K)
        if not torch.isfinite(logp).all():
            raise ConfigError(
                f"a teacher gave NaN/inf outputs in epoch {e}, samples {rows.start}.."
                f"{rows.stop - 1} of the cache build; nothing was written to the cache "
                "folder. Check the data (NaN pixels) and the teachers"
            )
        top, idx = logp.topk(k, dim=-1)
        top = top.clamp(min=-6e4)  # p ~ 0 stays finite in float16
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
        arrays["logp"][e, rows] = top.cpu().numpy().astype(np.float16)
        arrays["classes"][e, rows] = idx.cpu().numpy().astype(np.int16)
        arrays["rest"][e, rows] = rest.cpu().numpy().astype(np.float16)
        if pooled:
            for i, o in enumerate(outs):
                features = o.pooled.float().cpu().numpy().astype(np.float16)
                if not np.isfinite(features).all():
                    raise ConfigError(
                        f"teacher {i}'s pooled features are NaN/inf or exceed float16 "
                        f"(|x| > 65504) in epoch {e}; the cache cannot store them"
                    )
                arrays[f"pooled{i}"][e, rows] = features
    for a in arrays.values():
        a.flush()
    # Source index -> row, so lookups work from the batch's "index" field.
    np.save(tmp / "source_index.npy", dataset.indices.numpy().astype(np.int64))
    manifest = {
        **identity,
        "epochs": epochs,
        "top_k": k,
        "num_classes": k_cls,
        "pooled": pooled,
        "deterministic": deterministic,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _replayed_epochs(dataset: Any, epochs: int, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """``epochs`` passes over ``dataset`` in order, each with that epoch's replayed
    augmentation; every batch also carries its ``epoch`` and ``position`` (row) ``(B,)``."""
    n = len(dataset)
    for e in range(epochs):
        loader = DataLoader(dataset, batch_size=batch_size, sampler=[(e, i) for i in range(n)])
        start = 0
        for batch in loader:
            size = len(batch["index"])
            batch["epoch"] = torch.full((size,), e, dtype=torch.long)
            batch["position"] = torch.arange(start, start + size)
            start += size
            yield batch


def _memmap(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


_REBUILD = "rebuild it with `visdistill cache --config <your config> --out <dir> --overwrite`"


def _load_array(path: Path, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """Memory-map ``path/name``, refusing a missing, truncated or misshapen file."""
    file = path / name
    try:
        array = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise ConfigError(f"teacher cache {path} lacks {name}; {_REBUILD}") from None
    except (ValueError, OSError, EOFError) as e:  # truncated: "mmap length is greater ..."
        raise ConfigError(
            f"teacher cache {path}: {name} is truncated or damaged ({e}); {_REBUILD}"
        ) from None
    if len(array.shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        raise ConfigError(
            f"teacher cache {path}: {name} has shape {array.shape}, its manifest says "
            f"{tuple('*' if d is None else d for d in shape)}; {_REBUILD}"
        )
    return array


def _chunks(array: np.ndarray, rows: int = 1 << 16):
    flat = array.reshape(array.shape[0] * array.shape[1], -1) if array.ndim > 1 else array
    for start in range(0, len(flat), rows):
        yield np.asarray(flat[start : start + rows])


def _check_finite(path: Path, name: str, array: np.ndarray) -> None:
    """Read the whole array in chunks (a cache is read once per epoch anyway)."""
    bad = sum(int((~np.isfinite(chunk)).sum()) for chunk in _chunks(array))
    if bad:
        raise ConfigError(
            f"teacher cache {path}: {name} holds {bad} NaN/inf value(s): the file is damaged "
            f"or the teachers gave non-finite outputs; {_REBUILD}"
        )


def _chunked_range(array: np.ndarray) -> tuple[int, int]:
    lows, highs = zip(*((int(c.min()), int(c.max())) for c in _chunks(array)), strict=True)
    return min(lows), max(highs)


@dataclass
class TeacherCache:
    """A built cache opened for reading (arrays memory-mapped)."""

    path: Path
    manifest: dict[str, Any]
    logp: np.ndarray
    classes: np.ndarray
    rest: np.ndarray
    pooled: list[np.ndarray]
    row_of: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike) -> TeacherCache:
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise ConfigError(
                f"teacher cache not found: {manifest_file}; build it with "
                "`visdistill cache --config <your config> --out <dir>`"
            )
        try:
            manifest = json.loads(manifest_file.read_text())
            epochs, n, k = manifest["epochs"], manifest["train_samples"], manifest["top_k"]
            n_teachers, k_cls = len(manifest["teacher_names"]), manifest["num_classes"]
            pooled_on = manifest["pooled"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"teacher cache {path}: {MANIFEST} is damaged ({type(e).__name__}: {e}); "
                "rebuild it with `visdistill cache --config <your config> --out <dir> --overwrite`"
            ) from None
        source = _load_array(path, "source_index.npy", (n,))
        row_of = np.full(int(source.max()) + 1, -1, dtype=np.int64)
        row_of[source] = np.arange(len(source))
        logp = _load_array(path, "logp.npy", (epochs, n, n_teachers, k))
        classes = _load_array(path, "classes.npy", (epochs, n, n_teachers, k))
        rest = _load_array(path, "rest.npy", (epochs, n, n_teachers))
        pooled = [
            _load_array(path, f"pooled{i}.npy", (epochs, n, None))
            for i in range(n_teachers if pooled_on else 0)
        ]
        for name, array in [("logp.npy", logp), ("rest.npy", rest)] + [
            (f"pooled{i}.npy", a) for i, a in enumerate(pooled)
        ]:
            _check_finite(path, name, array)
        low, high = _chunked_range(classes)
        if low < 0 or high >= k_cls:
            raise ConfigError(
                f"teacher cache {path}: classes.npy holds class {low if low < 0 else high}, "
                f"outside 0..{k_cls - 1}: the file is damaged. Rebuild the cache with "
                "`visdistill cache --config <your config> --out <dir> --overwrite`"
            )
        return cls(path, manifest, logp, classes, rest, pooled, row_of)

    def check(self, module: Any, datamodule: Any, max_epochs: int | None) -> None:
        """Refuse a cache built for other teachers, data or augmentation, or too few epochs."""
        current = cache_identity(module, datamodule)
        diffs = [
            f"{key}: cache has {self.manifest.get(key)!r}, this run has {value!r}"
            for key, value in current.items()
            if self.manifest.get(key) != value
        ]
        if diffs:
            raise ConfigError(
                f"teacher cache {self.path} was built for another setup ({'; '.join(diffs)}). "
                "Rebuild it with `visdistill cache --config <this config> --out <dir> --overwrite`"
            )
        epochs = self.manifest["epochs"]
        if not self.manifest["deterministic"] and max_epochs is not None and max_epochs > epochs:
            raise ConfigError(
                f"teacher cache {self.path} holds {epochs} epochs of augmentations but the run "
                f"trains {max_epochs}; rebuild with --epochs {max_epochs} --overwrite"
            )

    def lookup(self, epoch: int | Tensor, index: Tensor, device: Any = None) -> list[ModelOutput]:
        """Teacher outputs for the samples ``index`` ``(B,)`` in ``epoch`` (one epoch for all,
        or one per sample ``(B,)``): one :class:`ModelOutput` per teacher, ``logits`` being
        log-probabilities ``(B, K)``."""
        epochs = self.manifest["epochs"]
        if self.manifest["deterministic"]:
            slot: Any = 0
        elif isinstance(epoch, Tensor) and epoch.ndim:
            slot = epoch.cpu().numpy().astype(np.int64)
        else:
            slot = int(epoch)
        if not self.manifest["deterministic"] and not (0 <= np.min(slot) <= np.max(slot) < epochs):
            raise ConfigError(
                f"teacher cache {self.path} holds epochs 0..{epochs - 1}, asked for epoch "
                f"{np.max(slot) if np.max(slot) >= epochs else np.min(slot)}; rebuild it with "
                "--epochs <the run's max_epochs> --overwrite"
            )
        rows = self.row_of[index.cpu().numpy()]
        if (rows < 0).any():
            raise ConfigError(
                f"teacher cache {self.path} has no entry for sample(s) "
                f"{index.cpu()[torch.from_numpy(rows < 0)].tolist()[:5]}"
            )
        logp = torch.from_numpy(np.asarray(self.logp[slot, rows], dtype=np.float32))
        classes = torch.from_numpy(np.asarray(self.classes[slot, rows], dtype=np.int64))
        rest = torch.from_numpy(np.asarray(self.rest[slot, rows], dtype=np.float32))
        k_cls, k = self.manifest["num_classes"], self.manifest["top_k"]
        # Non-top-k classes share the remaining mass equally.
        fill = rest - np.log(max(k_cls - k, 1))
        full = fill.unsqueeze(-1).expand(*rest.shape, k_cls).clone()
        full.scatter_(-1, classes, logp)
        outs = []
        for i in range(full.shape[1]):
            pooled = None
            if self.pooled:
                pooled = torch.from_numpy(np.asarray(self.pooled[i][slot, rows], dtype=np.float32))
                pooled = pooled.to(device)
            outs.append(ModelOutput(logits=full[:, i].to(device), pooled=pooled))
        return outs
