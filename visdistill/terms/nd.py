"""ND term: student embeddings toward the teachers' class-mean directions, with norms at
least the teachers' (Wang et al., arXiv 2305.17007 / ECCV 2024)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..checkpoints import atomic_write
from ..errors import CheckpointError, ConfigError
from ..loader_pass import batch_limit, run_over_loader, shard_loader, training_loader
from ..losses.multi_teacher import teacher_weighted_mean
from ..losses.nd import nd_loss
from ..models import Backbone, ModelOutput
from ..teachers import teacher_fingerprint
from .base import DistillTerm, uniform_or


class EmbeddingProjector(nn.Sequential):
    """The reference's ``EmbTrans``: BatchNorm1d -> Dropout(0.5) -> Linear, ``(B, D_s) -> (B, D_t)``."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.5) -> None:
        super().__init__(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
        nn.init.zeros_(self[2].bias)


class ND(DistillTerm):
    """ND loss against each teacher's class means (one projector per teacher whose width
    differs from the student's), averaged over teachers with the per-sample teacher
    weights. Combine with ``KD`` or ``DKD`` terms for KD++ / DKD++.

    Class means are the average pooled (pre-logits) teacher embedding per class over the
    training set, in float64 sums, all-reduced across ranks. They are computed once, when
    fit starts (a pass of the teachers over the training loader with a progress bar),
    unless already present (resumed checkpoint), given as ``class_means_file`` or found in
    ``cache_dir``. The cache key hashes the teachers' weights, the datamodule's class and
    hyper-parameters, the number of training samples and ``augmented``, so a cache of
    other teachers or data is never used. Zero case: 0 when every teacher is the student
    itself and each image's embedding points along its class mean (e.g. one image per class).

    Args:
        class_means_file: a safetensors file with ``teacher{i}`` tensors ``(K, D_i)`` (as
            written to the cache) to use instead of computing.
        cache_dir: directory for computed means (``None``: ``$VISDISTILL_CACHE`` or
            ``~/.cache/visdistill``, then ``class_means/``); ``""`` disables the cache.
        augmented: compute means on the training loader's augmented views (the reference
            does, on CIFAR); ``False`` switches the training transform off for the pass.
        dropout: dropout of the projectors (reference 0.5).
        weight: multiplier (the reference's ``nd`` weight; 0.5 to 4 in its scripts).
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "nd"
    needs_labels = True
    needs_pooled = True
    zero_parts = ("nd",)

    def __init__(
        self,
        class_means_file: str | None = None,
        cache_dir: str | None = None,
        augmented: bool = True,
        dropout: float = 0.5,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        self.class_means_file, self.cache_dir = class_means_file, cache_dir
        self.augmented, self.dropout = augmented, float(dropout)
        self.projectors = nn.ModuleList()
        self.register_buffer("means_ready", torch.tensor(False))
        self.num_teachers = 0

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        if student.headless:
            raise ConfigError(
                f"ND keeps one teacher class mean per class of the student's classifier, but the "
                f"student {student.name} is headless (num_classes 0); give it num_classes, or "
                "remove ND"
            )
        d_s, k = student.num_features, student.num_classes
        self.num_teachers = len(teachers)
        for i, teacher in enumerate(teachers):
            d_t = teacher.num_features
            self.projectors.append(
                nn.Identity() if d_t == d_s else EmbeddingProjector(d_s, d_t, self.dropout)
            )
            self.register_buffer(f"class_means_{i}", torch.zeros(k, d_t))

    # ------------------------------------------------------------------ class means
    def class_means(self) -> list[Tensor]:
        """Per teacher ``(K, D_t)`` class means."""
        return [getattr(self, f"class_means_{i}") for i in range(self.num_teachers)]

    def set_class_means(self, means: Sequence[Tensor]) -> None:
        """Install precomputed means, one ``(K, D_t)`` tensor per teacher (shapes checked)."""
        current = self.class_means()
        if len(means) != len(current):
            raise ConfigError(f"ND needs class means for {len(current)} teachers, got {len(means)}")
        for i, (old, new) in enumerate(zip(current, means, strict=True)):
            if tuple(new.shape) != tuple(old.shape):
                raise ConfigError(
                    f"ND class means of teacher {i} have shape {tuple(new.shape)}, expected "
                    f"{tuple(old.shape)} (classes, teacher embedding width): computed for "
                    "another teacher or data set?"
                )
            old.copy_(new.to(old))
        self.means_ready.fill_(True)

    @torch.no_grad()
    def compute_class_means(
        self,
        teachers: nn.Module,
        batches: Iterable[dict[str, Tensor]],
        device: Any = None,
        allow_missing: bool = False,
        *,
        progress: bool = False,
        max_batches: int | None = None,
    ) -> list[Tensor]:
        """Stream ``batches`` through ``teachers`` (a :class:`TeacherEnsemble`; eval mode,
        no_grad) and return per-teacher class means ``(K, D_t)``, summed in float64 and
        all-reduced across ranks; ``progress`` shows a bar, ``max_batches`` stops early.

        A class without samples is an error, unless ``allow_missing`` (a shortened debugging
        pass): its mean is then 0 (a constant ND loss of 1 for its samples), with a warning.
        """
        k = self.class_means()[0].shape[0]
        sums = [
            torch.zeros(k, m.shape[1], dtype=torch.float64, device=device)
            for m in self.class_means()
        ]
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        passes = run_over_loader(
            teachers,
            batches,
            lambda t, b: t(b["image"], pooled=True),
            device=device,
            desc="ND class means",
            progress=progress,
            max_batches=max_batches,
            leave=False,
        )
        for batch, outs in passes:
            target = batch["target"]
            if self.teacher_indices:  # the module's ensemble: this term's teachers only
                outs = self.own(outs)
            for s, out in zip(sums, outs, strict=True):
                s.index_add_(0, target, out.pooled.double())
            counts += torch.bincount(target, minlength=k).double()
        if dist.is_available() and dist.is_initialized():
            for t in [*sums, counts]:
                dist.all_reduce(t)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing and allow_missing:
            warnings.warn(
                f"ND class means: no sample of class(es) {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''} in the shortened pass; their means are 0",
                RuntimeWarning,
                stacklevel=2,
            )
            return [(s / counts.clamp_min(1)[:, None]).float() for s in sums]
        if missing:
            raise ConfigError(
                f"ND class means: no training samples of class(es) {missing}; every class "
                "needs at least one sample (check train_subset / the data)"
            )
        return [(s / counts[:, None]).float() for s in sums]

    def on_fit_start(self, module: Any) -> None:
        if bool(self.means_ready):
            return  # resumed from a checkpoint that holds them
        if self.class_means_file is not None:
            self.set_class_means(_load_means(Path(self.class_means_file), self.num_teachers))
            return
        trainer = module.trainer
        loader = training_loader(trainer, "ND's class means")
        cache = self._cache_path(module, loader)
        if cache is not None and cache.is_file():
            self.set_class_means(_load_means(cache, self.num_teachers))
            return
        dataset = (
            loader.dataset if self.augmented else _unaugmented(loader.dataset, trainer.datamodule)
        )
        loader = shard_loader(loader, trainer.global_rank, trainer.world_size, dataset)
        # fast_dev_run / limit_train_batches shorten the means pass too (not cached then).
        limit = batch_limit(trainer.limit_train_batches, len(loader))
        if limit is not None and trainer.is_global_zero:
            warnings.warn(
                f"ND class means from {limit} of {len(loader)} batches per process "
                f"(fast_dev_run / limit_train_batches: {trainer.limit_train_batches}); "
                "they are not cached",
                RuntimeWarning,
                stacklevel=2,
            )
        means = self.compute_class_means(
            module.teachers,
            loader,
            module.device,
            allow_missing=limit is not None,
            progress=trainer.is_global_zero,
            max_batches=limit,
        )
        self.set_class_means(means)
        if cache is not None and limit is None and trainer.is_global_zero:
            _save_means(cache, means)

    def _cache_path(self, module: Any, loader: DataLoader) -> Path | None:
        if self.cache_dir == "":
            return None
        root = self.cache_dir or os.environ.get("VISDISTILL_CACHE") or "~/.cache/visdistill"
        dm = getattr(module.trainer, "datamodule", None)
        key = class_means_key(
            self.own(list(module.teachers)), dm, len(loader.dataset), self.augmented
        )
        return Path(root).expanduser() / "class_means" / f"{key}.safetensors"

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if not bool(self.means_ready):
            raise ConfigError(
                "ND class means are not set: they are computed when fit starts, or call "
                "ND.set_class_means(...) / pass class_means_file"
            )
        weights = uniform_or(teacher_weights, len(target), len(teachers), student.pooled)
        losses = [
            nd_loss(proj(student.pooled), t.pooled, means, target, reduction="none")
            for proj, t, means in zip(self.projectors, teachers, self.class_means(), strict=True)
        ]
        return {"nd": teacher_weighted_mean(losses, weights)}


def class_means_key(
    teachers: Iterable[Backbone], datamodule: Any, n_samples: int, augmented: bool
) -> str:
    """Cache key of class means: a hash of the teachers' names and weights, the data
    module's class and hyper-parameters, the number of samples and ``augmented``."""
    h = hashlib.sha256(teacher_fingerprint(list(teachers)).encode())
    data_id = {
        "datamodule": type(datamodule).__qualname__ if datamodule is not None else None,
        "hparams": {k: repr(v) for k, v in dict(getattr(datamodule, "hparams", {}) or {}).items()},
        "samples": n_samples,
        "augmented": augmented,
    }
    h.update(json.dumps(data_id, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _unaugmented(dataset: Any, datamodule: Any) -> Any:
    """``dataset`` with the data module's evaluation transform instead of its augmentation
    (an image folder's images still need decoding, resizing and cropping)."""
    eval_transform = getattr(datamodule, "eval_transform", None)
    if not hasattr(dataset, "transform") or eval_transform is None:
        if getattr(datamodule, "augment", False):
            raise ConfigError(
                f"ND(augmented=False): the training set of {type(datamodule).__name__} "
                f"({type(dataset).__name__}) has no transform to replace, so its class means "
                "would be taken on augmented images; set augmented: true, or give the class "
                "means as class_means_file"
            )
        return dataset
    dataset = copy.copy(dataset)
    dataset.transform = eval_transform()
    return dataset


def _load_means(path: Path, n_teachers: int) -> list[Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"ND class means file not found: {path}")
    tensors = load_file(str(path))
    missing = [f"teacher{i}" for i in range(n_teachers) if f"teacher{i}" not in tensors]
    if missing:
        raise CheckpointError(
            f"{path} lacks class means for {missing} (has {sorted(tensors)}); was it computed "
            f"for {n_teachers} teachers?"
        )
    return [tensors[f"teacher{i}"] for i in range(n_teachers)]


def _save_means(path: Path, means: Sequence[Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {f"teacher{i}": m.contiguous().cpu() for i, m in enumerate(means)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
