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
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .errors import ConfigError
from .models import ModelOutput
from .teachers import teacher_fingerprint

FORMAT_VERSION = 1


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
) -> Path:
    """Run the module's teachers over ``epochs`` epochs of replayed augmentations.

    Args:
        module: a :class:`DistillationModule` with teachers.
        datamodule: an in-memory data module (replayable augmentation), set up for fit.
        out: cache directory (replaced atomically: built in a sibling temp dir, renamed).
        epochs: epochs of augmentations to store (>= the runs' ``max_epochs``); ignored
            (1 is stored) when the data module does not augment.
        top_k: classes kept per sample and teacher (the rest share the remaining mass);
            ``k >= num_classes`` stores the exact distribution.
        pooled: also store the teachers' pooled features (fp16), for terms like ND.
    """
    if module.teachers is None:
        raise ConfigError("the teacher cache needs teachers; the model has none")
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
    n, m, k_cls = len(dataset), len(module.teachers), module.teachers.num_classes
    k = min(int(top_k), k_cls)
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    device = module.device
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * n, desc="teacher cache", unit="img", disable=not progress)
    for e in range(epochs):
        keys = [(e, i) for i in range(n)]
        loader = DataLoader(dataset, batch_size=batch_size, sampler=keys)
        start = 0
        for batch in loader:
            outs = module.teachers(batch["image"].to(device), pooled=pooled)
            rows = slice(start, start + len(batch["target"]))
            logp = torch.stack([o.logits.float().log_softmax(-1) for o in outs], 1)  # (B,M,K)
            top, idx = logp.topk(k, dim=-1)
            rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
            arrays["logp"][e, rows] = top.cpu().numpy().astype(np.float16)
            arrays["classes"][e, rows] = idx.cpu().numpy().astype(np.int16)
            arrays["rest"][e, rows] = rest.cpu().numpy().astype(np.float16)
            if pooled:
                for i, o in enumerate(outs):
                    arrays[f"pooled{i}"][e, rows] = o.pooled.float().cpu().numpy()
            start += len(batch["target"])
            bar.update(len(batch["target"]))
    bar.close()
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
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _memmap(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


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
        manifest = json.loads(manifest_file.read_text())
        load = lambda name: np.load(path / name, mmap_mode="r")  # noqa: E731
        source = np.load(path / "source_index.npy")
        row_of = np.full(int(source.max()) + 1, -1, dtype=np.int64)
        row_of[source] = np.arange(len(source))
        n_teachers = len(manifest["teacher_names"])
        pooled = [load(f"pooled{i}.npy") for i in range(n_teachers)] if manifest["pooled"] else []
        return cls(path, manifest, load("logp.npy"), load("classes.npy"), load("rest.npy"),
                   pooled, row_of)  # fmt: skip

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
                "Rebuild it with `visdistill cache --config <this config> --out <dir>`"
            )
        epochs = self.manifest["epochs"]
        if not self.manifest["deterministic"] and max_epochs is not None and max_epochs > epochs:
            raise ConfigError(
                f"teacher cache {self.path} holds {epochs} epochs of augmentations but the run "
                f"trains {max_epochs}; rebuild with --epochs {max_epochs}"
            )

    def lookup(self, epoch: int, index: Tensor, device: Any = None) -> list[ModelOutput]:
        """Teacher outputs for the samples ``index`` ``(B,)`` in ``epoch``: one
        :class:`ModelOutput` per teacher, ``logits`` being log-probabilities ``(B, K)``."""
        slot = 0 if self.manifest["deterministic"] else int(epoch)
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
