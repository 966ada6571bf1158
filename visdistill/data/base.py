"""What every visdistill DataModule shares.

Batches are dicts ``{"image": (B, 3, H, W) float in [0, 1], "target": (B,) int64,
"index": (B,) int64}``. Images are *canonical*: 3 channels, un-normalised; every
model normalises for itself. ``index`` is the sample's position in the full source
split, so it stays the same whatever subset or validation carve-out is used (caches
key on it). Training batches of replayable data also carry ``epoch`` ``(B,)`` (the
augmentation's epoch); with mixup/CutMix they carry a soft ``target`` ``(B, K)`` float
and ``mix_lam`` ``(B,)`` (see :mod:`visdistill.data.mixing`).

The validation split is carved from the training set with a seeded permutation:
model selection never looks at the test set.

Data without labels (``labels: false``, or an image folder without class sub-folders)
yields ``target = -1`` (:data:`UNLABELLED`) for every sample: label-free distillation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..errors import ConfigError
from ..lightning_private import uses_distributed_sampler
from .mixing import BatchMixer, MixupCollate, check_mixing_options, mixing_enabled
from .replay import ReplayCropFlip, epoch_sampler
from .resumable import ResumableDataLoader

UNLABELLED = -1  # the target of every sample of a data set without labels


def data_has_labels(datamodule: object | None) -> bool:
    """Whether ``datamodule``'s samples carry class labels: its ``has_labels`` (visdistill's
    data modules), else ``True`` (any other data is taken as labelled)."""
    return bool(getattr(datamodule, "has_labels", True))


def split_indices(
    n: int, val_split: int | float, seed: int, train_subset: int | None = None
) -> tuple[Tensor, Tensor]:
    """Seeded ``(train_idx, val_idx)`` over ``range(n)``.

    Args:
        val_split: a fraction when below 1 (``0.1`` = 10 %), else a count of samples held
            out for validation.
        train_subset: keep only this many training samples (fast runs).
    """
    if val_split < 0:
        raise ConfigError(
            f"val_split must be >= 0 (a fraction below 1 or a count of samples), got {val_split}"
        )
    n_val = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if not 0 <= n_val < n:
        raise ConfigError(f"val_split={val_split} leaves no training data out of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if train_subset is not None:
        if train_subset <= 0:
            raise ConfigError(f"train_subset must be positive, got {train_subset}")
        warn_large_subset(train_subset, len(train_idx))
        train_idx = train_idx[:train_subset]
    return train_idx.sort().values, val_idx.sort().values


def warn_large_subset(train_subset: int, available: int) -> None:
    """Warn when ``train_subset`` asks for more training samples than there are."""
    if train_subset > available:
        warnings.warn(
            f"train_subset={train_subset} is larger than the {available} training samples "
            f"available (after the validation carve-out); training on all {available}",
            UserWarning,
            stacklevel=3,
        )


def subset(n: int, limit: int | None, seed: int) -> Tensor:
    """All of ``range(n)``, or a seeded random ``limit`` of it (sorted)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


class ArrayImageDataset(Dataset):
    """In-memory uint8 images ``(N, C, H, W)`` served as canonical float dict samples."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Tensor,
        transform: v2.Transform | None = None,
    ) -> None:
        self.images, self.targets, self.indices = images, targets, indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        # (epoch, position) keys come from EpochSampler: replayable augmentation.
        epoch, i = key if isinstance(key, tuple) else (0, key)
        j = int(self.indices[i])
        img = self.images[j]
        if isinstance(self.transform, ReplayCropFlip):
            img = self.transform(img, epoch, j)
        elif self.transform is not None:
            img = self.transform(img)
        img = img.float().div_(255)
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        sample = {"image": img, "target": self.targets[j], "index": torch.tensor(j)}
        if isinstance(key, tuple):
            sample["epoch"] = torch.tensor(epoch)
        return sample


class VisionDataModule(L.LightningDataModule):
    """Loaders, splits and options common to every data set.

    Args:
        batch_size: per-device batch size.
        num_workers: DataLoader workers (0 keeps everything in the main process).
        image_size: side of the canonical square images.
        augment: random crop (padding ``image_size // 8``) and horizontal flip on train;
            for in-memory sets the crop and flip of a sample in an epoch are a function of
            ``seed``, the epoch and the sample (:class:`ReplayCropFlip`), so the teacher
            cache can replay them.
        val_split: fraction (< 1) or count (>= 1) of training samples held out for validation.
        train_subset: use only this many training samples (after the carve-out).
        test_subset: evaluate on this many test samples (seeded random subset).
        seed: seeds the split, subsets and augmentation parameters (the shuffle order
            follows the training run's seed).
        labels: ``False`` ignores the data's labels: every sample's ``target`` is ``-1``
            in every split (label-free distillation; no accuracy is measured).
        mixup_alpha, cutmix_alpha, cutmix_minmax, mixup_prob, mixup_switch_prob,
            mixup_mode, label_smoothing: :class:`timm.data.Mixup`'s options (timm's
            ``--mixup``, ``--cutmix``, ``--cutmix-minmax``, ``--mixup-prob``,
            ``--mixup-switch-prob``, ``--mixup-mode``, ``--smoothing``), applied to whole
            training batches, replayably (:class:`~visdistill.data.mixing.BatchMixer`).
            Mixing is on when ``mixup_alpha`` or ``cutmix_alpha`` is above 0 or
            ``cutmix_minmax`` is set; then ``batch_size`` must be even, the last short
            batch of an epoch is dropped and training targets are soft ``(B, K)`` (with
            ``label_smoothing``). Validation and test are never mixed.
    """

    num_classes: int = 0
    # True when training streams an iterable data set whose ``__len__`` is exact per rank and
    # worker (LitData splits the chunks itself): Lightning's warning that such a length
    # "could be inaccurate" is then dropped during the fit.
    exact_iterable_length: bool = False

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        image_size: int = 32,
        augment: bool = True,
        val_split: int | float = 0.1,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
        labels: bool = True,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if image_size <= 0:
            raise ConfigError(f"image_size must be a positive side in pixels, got {image_size}")
        if val_split < 0:
            raise ConfigError(
                f"val_split must be >= 0 (a fraction below 1 or a count of samples), got "
                f"{val_split}"
            )
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        check_mixing_options(
            mixup_alpha,
            cutmix_alpha,
            cutmix_minmax,
            mixup_prob,
            mixup_switch_prob,
            mixup_mode,
            label_smoothing,
        )
        self.mixing: dict = {
            "mixup_alpha": mixup_alpha,
            "cutmix_alpha": cutmix_alpha,
            "cutmix_minmax": tuple(cutmix_minmax) if cutmix_minmax is not None else None,
            "mixup_prob": mixup_prob,
            "mixup_switch_prob": mixup_switch_prob,
            "mixup_mode": mixup_mode,
            "label_smoothing": label_smoothing,
        }
        if self.mixes and batch_size % 2:
            raise ConfigError(
                f"mixup/CutMix mix sample i of a batch with sample B-1-i, so batch_size must "
                f"be even, got {batch_size}"
            )
        if label_smoothing and not self.mixes:
            raise ConfigError(
                f"label_smoothing {label_smoothing} on the data smooths the mixed targets of "
                "mixup/CutMix, which are off (mixup_alpha, cutmix_alpha 0); without mixing "
                "set model.label_smoothing instead"
            )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.image_size, self.augment = image_size, augment
        self.val_split, self.train_subset, self.test_subset = val_split, train_subset, test_subset
        self.seed, self.labels = seed, labels
        self.train_set = self.val_set = self.test_set = None
        # Recorded in checkpoints; `visdistill export` reads image_size from here.
        self.save_hyperparameters()

    @property
    def has_labels(self) -> bool:
        """Whether samples carry class labels (else every ``target`` is ``-1``)."""
        return self.labels and self.num_classes > 0

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (mixup or CutMix on)."""
        m = self.mixing
        return mixing_enabled(m["mixup_alpha"], m["cutmix_alpha"], m["cutmix_minmax"])

    def mixer(self) -> BatchMixer | None:
        """The training batches' :class:`~visdistill.data.mixing.BatchMixer` (``None``
        when mixing is off)."""
        return BatchMixer(self.num_classes, self.seed, **self.mixing) if self.mixes else None

    def _world(self) -> tuple[int, int]:
        """``(world_size, rank)`` the training loader shards over."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and uses_distributed_sampler(trainer):
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def eval_transform(self) -> Callable[..., Tensor] | None:
        """The transform of the evaluation sets, for a pass over the training images without
        augmentation (ND's ``augmented: false``); ``None``: the in-memory sets' images need
        none."""
        return None

    def sample_augmentation(self) -> dict | None:
        """Description of the per-sample train augmentation (``None`` when there is none);
        subclasses with replayable augmentation override it."""
        if self.augment:
            raise ConfigError(
                f"{type(self).__name__}'s training augmentation cannot be replayed; set "
                "augment: false, or use a data module with replayable augmentation"
            )
        return None

    def augmentation(self) -> dict | None:
        """Description of the train augmentation (``None`` when there is none), for cache
        manifests: what a cache of the teachers' outputs per ``(epoch, index)`` must agree
        on. With mixing it also holds the mixing options and what fixes the batches an
        image is mixed in: batch size, ``drop_last``, world size and shuffle seed."""
        sample = self.sample_augmentation()
        mixer = self.mixer()
        if mixer is None:
            return sample
        return {
            **(sample or {"kind": "none"}),
            "mixing": mixer.describe(),
            "batch_size": self.batch_size,
            "drop_last": True,
            "world_size": self._world()[0],
            "shuffle_seed": torch.initial_seed() % 2**31,
        }

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            generator=torch.Generator(),  # iter() leaves the global RNG alone (exact resume)
        )

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(epoch_keys=False)

    def _train_loader(self, epoch_keys: bool) -> DataLoader:
        """Shuffled by an :class:`EpochSampler` (sharded over DDP ranks, so the ranks' batches
        of ``batch_size`` make up the single-process batch of ``world_size * batch_size``)
        in a :class:`ResumableDataLoader` (exact mid-epoch resume). ``epoch_keys``: the
        dataset takes ``(epoch, position)`` keys (replayable augmentation).

        With mixup/CutMix the batches are mixed in the collate function (worker side) and
        the last short batch is dropped (timm mixes pairs)."""
        world, rank = self._world()
        # torch.initial_seed() is the run's seed (seed_everything): shuffles differ per run,
        # augmentation parameters do not.
        sampler = epoch_sampler(
            len(self.train_set), torch.initial_seed() % 2**31, world, rank, epoch_keys
        )
        mixer = self.mixer()
        if mixer is not None and len(sampler) < self.batch_size:
            raise ConfigError(
                f"mixup/CutMix drop the last short batch, and the {len(sampler)} training "
                f"samples per process are fewer than batch_size {self.batch_size}: no batch "
                "is left; lower batch_size or use more training samples"
            )
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=MixupCollate(mixer) if mixer is not None else None,
            drop_last=mixer is not None,
            # Loader-owned generator: iter() draws worker seeds from it, not from the global
            # RNG, so the global stream (dropout, teacher dropping) depends only on steps.
            generator=torch.Generator().manual_seed(torch.initial_seed() % 2**31),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class ArrayDataModule(VisionDataModule):
    """A data set small enough to hold as one uint8 tensor (MNIST-like, CIFAR, digits).

    Subclasses implement :meth:`load` returning ``(images uint8 (N, C, H, W), targets)``.
    """

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        """:meth:`load`, with every target ``-1`` when labels are off."""
        images, targets = self.load(train)
        if not self.has_labels:
            targets = torch.full_like(targets, UNLABELLED)
        return images, targets

    def _canonical(self, images: Tensor) -> Tensor:
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        resized = F.interpolate(
            images.float(),
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
            antialias=images.shape[-1] > self.image_size,
        )
        return resized.round_().clamp_(0, 255).to(torch.uint8)

    def _train_transform(self) -> ReplayCropFlip | None:
        if not self.augment:
            return None
        return ReplayCropFlip(self.image_size, self.image_size // 8, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(epoch_keys=True)

    def sample_augmentation(self) -> dict | None:
        """Description of the crop and flip (``None`` when off), for cache manifests."""
        t = self.train_set.transform if self.train_set is not None else None
        return t.describe() if isinstance(t, ReplayCropFlip) else None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, targets = self._load(train=True)
            images = self._canonical(images)
            train_idx, val_idx = split_indices(
                len(images), self.val_split, self.seed, self.train_subset
            )
            self.train_set = ArrayImageDataset(images, targets, train_idx, self._train_transform())
            self.val_set = ArrayImageDataset(images, targets, val_idx)
        if stage in (None, "test", "predict") and self.test_set is None:
            images, targets = self._load(train=False)
            idx = subset(len(images), self.test_subset, self.seed)
            self.test_set = ArrayImageDataset(self._canonical(images), targets, idx)
