"""Lightning callbacks that log kNN and linear-probe top-1 of the frozen student.

They measure a student trained without labels (``labels: false``, a headless student)
on labelled data: ``val/knn_top1`` (:class:`KNNProbe`) and ``val/linear_top1``
(:class:`LinearProbe`), fractions in ``[0, 1]`` like ``val/acc``. The functions they call
are in :mod:`visdistill.probes`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from .data.base import VisionDataModule
from .errors import ConfigError
from .probes import (
    WEIGHT_DECAYS,
    extract_features,
    knn_classify,
    linear_probe,
    probe_datamodule,
    reference_indices,
)

# Features of the latest extraction, per trainer: a KNNProbe and a LinearProbe on the same
# data in one run extract once per validation epoch.
_LATEST: weakref.WeakKeyDictionary[L.Trainer, tuple[tuple, tuple[Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)


class _FrozenFeatureProbe(L.Callback):
    """Extracts the student's pooled features over a labelled reference (train) set and
    the labelled validation set, then logs :meth:`score` as :attr:`metric`."""

    metric = ""

    def __init__(
        self,
        data: VisionDataModule | None = None,
        every_n_epochs: int = 1,
        max_train_samples: int | None = 10_000,
        max_val_samples: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(
                f"{type(self).__name__} every_n_epochs must be >= 1, got {every_n_epochs}"
            )
        if batch_size < 1:
            raise ConfigError(f"{type(self).__name__} batch_size must be >= 1, got {batch_size}")
        for name, cap in (
            ("max_train_samples", max_train_samples),
            ("max_val_samples", max_val_samples),
        ):
            if cap is not None and cap < 1:
                raise ConfigError(
                    f"{type(self).__name__} {name} must be >= 1 or null (all), got {cap}"
                )
        self.data = data
        self.every_n_epochs, self.batch_size, self.seed = every_n_epochs, batch_size, seed
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.last: dict[str, Any] = {}  # what the latest evaluation found
        self._probe_data: VisionDataModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        if not hasattr(pl_module, "student"):
            raise ConfigError(
                f"{type(self).__name__} probes `module.student`; {type(pl_module).__name__} has none"
            )
        source = self.data if self.data is not None else getattr(trainer, "datamodule", None)
        if source is None:
            raise ConfigError(
                f"{type(self).__name__} needs a data module: the run has none (dataloaders "
                "were passed directly); give the callback `data:` (a labelled data module)"
            )
        self._probe_data = probe_datamodule(source)
        self._probe_data.setup("fit")
        if not len(self._probe_data.val_set):
            raise ConfigError(
                f"{type(self).__name__}: {type(source).__name__} has no validation samples "
                "(val_split: 0?); the probes score the validation split"
            )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _LATEST.pop(trainer, None)  # the student changed since the last extraction

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _LATEST.pop(trainer, None)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        train_x, train_y, val_x, val_y = self._features(trainer, pl_module)
        value = self.score(train_x, train_y, val_x, val_y, self._probe_data.num_classes)
        self.last.update(epoch=trainer.current_epoch, num_train=len(train_y), num_val=len(val_y))
        # Every rank holds all features and computes the same value; sync_dist keeps
        # callback_metrics equal on every rank (and silences Lightning's epoch-level warning).
        pl_module.log(self.metric, value, sync_dist=True)

    def score(
        self, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int
    ) -> float:
        raise NotImplementedError

    def _key(self, trainer: L.Trainer) -> tuple:
        data = self._probe_data
        described = (type(data).__qualname__, repr(sorted(dict(data.hparams).items())))
        return (
            trainer.global_step,
            trainer.current_epoch,
            described,
            self.max_train_samples,
            self.max_val_samples,
            self.seed,
        )

    @torch.no_grad()
    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, ...]:
        key = self._key(trainer)
        cached = _LATEST.get(trainer)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = self._probe_data
        out = []
        for dataset, cap in (
            (data.train_set, self.max_train_samples),
            (data.val_set, self.max_val_samples),
        ):
            indices = reference_indices(len(dataset), cap, self.seed)
            out.extend(self._extract_all_ranks(trainer, pl_module, dataset, indices))
        features = tuple(out)
        _LATEST[trainer] = (key, features)
        return features

    def _extract_all_ranks(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataset, indices: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Rank ``r`` of ``w`` extracts positions ``r, r + w, ...`` of ``indices``; the
        all-gathered features are put back in the order of ``indices``, so every rank ends
        with what one process extracts."""
        world, rank, n = trainer.world_size, trainer.global_rank, len(indices)
        precision = trainer.precision_plugin
        features, targets = extract_features(
            pl_module.student,
            dataset,
            indices[rank::world],
            self.batch_size,
            self._probe_data.num_workers,
            pl_module.device,
            context=precision.forward_context,
            convert_input=precision.convert_input,
        )
        if world == 1:
            return features, targets
        per_rank = math.ceil(n / world)

        def gather(x: Tensor) -> Tensor:
            padded = torch.cat([x, x.new_zeros(per_rank - len(x), *x.shape[1:])])
            return unshard(pl_module.all_gather(padded), n)

        return gather(features), gather(targets)


def unshard(gathered: Tensor, n: int) -> Tensor:
    """Undo a strided split: ``gathered`` is ``(world, per_rank, ...)``, rank ``r``'s rows
    being positions ``r, r + world, ...`` of ``n`` items, zero-padded to ``per_rank``.
    Returns the ``n`` rows in their original order."""
    world, per_rank = gathered.shape[:2]
    # Position j * world + r is rank r's j-th row; the padding rows land past n.
    return gathered.transpose(0, 1).reshape(world * per_rank, *gathered.shape[2:])[:n]


class KNNProbe(_FrozenFeatureProbe):
    """Log ``val/knn_top1``: DINO's weighted kNN top-1 of the frozen student's pooled
    features (:func:`~visdistill.probes.knn_classify`; Caron et al., 2021).

    Every ``every_n_epochs`` validation epochs, the student (in eval mode, under
    ``no_grad``, its mode restored after) embeds up to ``max_train_samples`` training
    images (a seeded random subset, the reference set) and the validation images, both
    without augmentation and with labels; each validation image is classified by the
    votes of its ``k`` most cosine-similar reference images, weighted by
    ``exp(cos / temperature)``. The value is a fraction in ``[0, 1]`` like ``val/acc``.

    Labelled data: ``data`` when given, else the run's own data module. Data trained with
    ``labels: false`` is read again with labels on (same class, same settings, same
    splits); data without labels at all (a flat image folder) needs ``data``. Under DDP
    every rank embeds its share and the features are all-gathered: the same value as one
    process.

    Args:
        data: a labelled visdistill data module (default: the run's).
        k: neighbours (20 in DINO).
        temperature: vote temperature (0.07 in DINO).
        every_n_epochs: evaluate every this many epochs (skipped in the sanity check).
        max_train_samples: cap on the reference set (``null``: all training images).
        max_val_samples: cap on the validation images (``null``: all).
        batch_size: images per forward pass.
        seed: draws the capped subsets.
    """

    metric = "val/knn_top1"

    def __init__(
        self,
        data: VisionDataModule | None = None,
        k: int = 20,
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        max_train_samples: int | None = 10_000,
        max_val_samples: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(data, every_n_epochs, max_train_samples, max_val_samples, batch_size, seed)
        if k < 1:
            raise ConfigError(f"KNNProbe k must be >= 1, got {k}")
        if not temperature > 0:
            raise ConfigError(f"KNNProbe temperature must be > 0, got {temperature}")
        self.k, self.temperature = k, temperature

    def score(self, train_x, train_y, val_x, val_y, num_classes) -> float:
        classes = max(num_classes, int(train_y.max()) + 1, int(val_y.max()) + 1)
        pred = knn_classify(train_x, train_y, val_x, self.k, self.temperature, classes)
        top1 = float((pred == val_y).double().mean())
        self.last = {"top1": top1}
        return top1


class LinearProbe(_FrozenFeatureProbe):
    """Log ``val/linear_top1``: top-1 of a logistic-regression probe fitted on the frozen
    student's pooled features of the training images (:func:`~visdistill.probes.linear_probe`).

    Same features as :class:`KNNProbe` (a KNNProbe and a LinearProbe with the same data,
    caps and seed share one extraction per epoch). The probe standardises the features,
    chooses its L2 weight decay among ``weight_decays`` on a seeded ``holdout`` fraction of
    the reference set, refits on all of it with full-batch L-BFGS and is scored on the
    validation images. The value is a fraction in ``[0, 1]``; the chosen weight decay is
    in ``last["weight_decay"]``.

    Args:
        data, every_n_epochs, max_train_samples, max_val_samples, batch_size, seed: as
            :class:`KNNProbe`.
        weight_decays: L2 strengths swept.
        holdout: fraction of the reference set that chooses the weight decay.
        max_iter: L-BFGS iterations per fit.
    """

    metric = "val/linear_top1"

    def __init__(
        self,
        data: VisionDataModule | None = None,
        weight_decays: Sequence[float] = WEIGHT_DECAYS,
        holdout: float = 0.2,
        max_iter: int = 200,
        every_n_epochs: int = 1,
        max_train_samples: int | None = 10_000,
        max_val_samples: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__(data, every_n_epochs, max_train_samples, max_val_samples, batch_size, seed)
        if not weight_decays or any(wd < 0 for wd in weight_decays):
            raise ConfigError(f"LinearProbe weight_decays must be values >= 0, got {weight_decays}")
        if not 0 < holdout < 1:
            raise ConfigError(f"LinearProbe holdout must be a fraction in (0, 1), got {holdout}")
        self.weight_decays, self.holdout, self.max_iter = tuple(weight_decays), holdout, max_iter

    def score(self, train_x, train_y, val_x, val_y, num_classes) -> float:
        result = linear_probe(
            train_x,
            train_y,
            val_x,
            val_y,
            num_classes=max(num_classes, int(train_y.max()) + 1, int(val_y.max()) + 1),
            weight_decays=self.weight_decays,
            holdout=self.holdout,
            max_iter=self.max_iter,
            seed=self.seed,
        )
        self.last = {
            "top1": result.top1,
            "weight_decay": result.weight_decay,
            "sweep": result.sweep,
        }
        return result.top1
