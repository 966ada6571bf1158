"""timm's image augmentation (``timm.data.create_transform``) for data modules that decode
image files, configured by timm's own option names.

The transforms produce canonical images (``(3, H, W)`` float, un-normalised, see
:mod:`visdistill.data.base`): every model normalises for itself. timm erases in normalised
space (random erasing fills with the normalised mean, or with normal noise); the erased
image is mapped back with the same mean and std, so a student normalising with them sees
exactly timm's tensor. Erased pixels may then lie outside ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import str_to_interp_mode
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms

from ..errors import ConfigError
from .base import VisionDataModule
from .replay import ReplayTransform

ERASING_MODES = ("const", "rand", "pixel")


class Denormalize:
    """``x * std + mean`` per channel of a ``(C, H, W)`` tensor: undoes ``Normalize``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _pair(value: Sequence[float] | None, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if len(value) != 2 or not 0 < float(value[0]) <= float(value[1]):
        raise ConfigError(
            f"{name} must be two numbers [low, high] with 0 < low <= high, got {list(value)}"
        )
    return float(value[0]), float(value[1])


def _three(values: Sequence[float], name: str) -> tuple[float, float, float]:
    """Per-channel statistics for the RGB canonical images (a grayscale spec's one value x3)."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ConfigError(f"{name} needs 3 values (one per RGB channel) or 1, got {list(values)}")
    return values  # type: ignore[return-value]


def timm_transform(
    train: bool,
    image_size: int,
    *,
    augment: bool = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    **options: Any,
) -> Callable[[Any], Tensor]:
    """timm's train (``train`` and ``augment``) or eval transform of a PIL image into a
    canonical ``(3, image_size, image_size)`` float tensor.

    ``options`` are :func:`timm.data.create_transform`'s (``scale``, ``ratio``, ``hflip``,
    ``vflip``, ``color_jitter``, ``auto_augment``, ``re_prob``, ``re_mode``, ``re_count``,
    ``interpolation``, ``crop_pct``, ``crop_mode``); ``mean``/``std`` set RandAugment's fill
    colour and random erasing's statistics only (nothing is normalised).
    """
    is_train = train and augment
    erasing = is_train and options.get("re_prob", 0.0) > 0
    if not is_train:
        # Eval options only; a train-only option must not reach the eval transform.
        keep = ("interpolation", "crop_pct", "crop_mode")
        options = {k: v for k, v in options.items() if k in keep}
        if options.get("interpolation") == "random":
            options["interpolation"] = "bilinear"
    try:
        transform = create_transform(
            image_size, is_training=is_train, mean=mean, std=std, normalize=erasing, **options
        )
    except (AssertionError, KeyError, ValueError) as e:
        raise ConfigError(
            f"timm cannot build the {'train' if is_train else 'eval'} transform from "
            f"{options}: {type(e).__name__}: {e}. See timm.data.create_transform for the options "
            "(auto_augment e.g. 'rand-m9-mstd0.5', 'augmix-m5-w3', 'original')"
        ) from e
    steps = list(transform.transforms)
    if erasing:
        steps.append(Denormalize(mean, std))
    else:
        steps.append(transforms.ConvertImageDtype(torch.float32))  # uint8 -> [0, 1]
    return transforms.Compose(steps)


class TimmAugmentDataModule(VisionDataModule):
    """Base of the data modules reading encoded image files (folders, shards): train images
    get timm's ``create_transform`` augmentation, configured by timm's option names; eval
    images are resized to ``image_size / crop_pct`` and centre-cropped to ``image_size``.

    Args:
        scale: RandomResizedCrop area range, default ``[0.08, 1.0]``.
        ratio: RandomResizedCrop aspect-ratio range, default ``[3/4, 4/3]``.
        hflip: horizontal flip probability.
        vflip: vertical flip probability.
        color_jitter: brightness/contrast/saturation strength (one number) or 3-4 numbers
            (with hue); ``null`` turns it off. timm skips it when ``auto_augment`` is set.
        auto_augment: timm policy string: ``rand-m9-mstd0.5`` (RandAugment),
            ``rand-m9-mstd0.5-inc1``, ``augmix-m5-w3``, ``original``, ``v0`` (AutoAugment).
        re_prob: random erasing probability (0 = off).
        re_mode: erasing fill: ``const`` (the mean colour), ``rand`` (one random colour per
            box), ``pixel`` (per-pixel noise).
        re_count: maximum number of erased boxes per image.
        interpolation: ``bilinear``, ``bicubic``, ``nearest``, ``lanczos``, ... or, for
            training only, ``random``.
        crop_pct: evaluation centre-crop fraction (timm default 0.875 when ``null``).
        crop_mode: evaluation crop mode: ``center`` (default), ``squash``, ``border``.
        mean, std: the student's normalisation, for RandAugment's fill colour and random
            erasing (``null``: the student's input spec when the data module is attached
            to a distillation run, else ImageNet's).
        replay: make every random draw of a training sample's augmentation (crop box,
            flips, RandAugment ops and magnitudes, colour jitter, erasing boxes) a function
            of ``seed``, the epoch and the sample
            (:class:`~visdistill.data.replay.ReplayTransform`), in worker processes too;
            training batches then carry ``epoch`` and the teacher cache can replay them.
            ``False``: timm's transform draws from the worker's random streams.
        **kwargs: see :class:`~visdistill.data.base.VisionDataModule`.
    """

    def __init__(
        self,
        scale: tuple[float, float] | None = None,
        ratio: tuple[float, float] | None = None,
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float | tuple[float, ...] | None = 0.4,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "const",
        re_count: int = 1,
        interpolation: str = "bilinear",
        crop_pct: float | None = None,
        crop_mode: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        replay: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.replay = bool(replay)
        # The student's input spec, set by whoever builds the run without a trainer (the
        # teacher cache command), so the augmentation is the one fit will use.
        self.student_spec: Any = None
        for name, p in (("hflip", hflip), ("vflip", vflip), ("re_prob", re_prob)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name} is a probability in [0, 1], got {p}")
        if re_mode not in ERASING_MODES:
            raise ConfigError(f"re_mode must be one of {', '.join(ERASING_MODES)}, got {re_mode!r}")
        if re_count < 1:
            raise ConfigError(f"re_count (boxes erased per image) must be >= 1, got {re_count}")
        if interpolation != "random":
            try:
                str_to_interp_mode(interpolation)
            except KeyError as e:
                raise ConfigError(
                    f"unknown interpolation {interpolation!r}: use bilinear, bicubic, nearest, "
                    "lanczos, box, hamming, or random (training only)"
                ) from e
        if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if isinstance(color_jitter, Sequence) and len(color_jitter) not in (3, 4):
            raise ConfigError(
                "color_jitter is one number or 3 (brightness, contrast, saturation) or 4 "
                f"(+ hue) numbers, got {list(color_jitter)}"
            )
        self.timm_options: dict[str, Any] = {
            "scale": _pair(scale, "scale"),
            "ratio": _pair(ratio, "ratio"),
            "hflip": float(hflip),
            "vflip": float(vflip),
            "color_jitter": tuple(color_jitter)
            if isinstance(color_jitter, Sequence)
            else color_jitter,
            "auto_augment": auto_augment or None,
            "re_prob": float(re_prob),
            "re_mode": re_mode,
            "re_count": int(re_count),
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "crop_mode": crop_mode,
        }
        self.mean = _three(mean, "mean") if mean is not None else None
        self.std = _three(std, "std") if std is not None else None
        # Bad option values (an unknown auto_augment policy, ...) fail here, not in a worker.
        self._transform(True), self._transform(False)

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` for the augmentation: the configured ones, else the student's input
        spec (``student_spec`` when set, else the attached run's student's), else ImageNet's."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        spec = self.student_spec or getattr(getattr(module, "student", None), "input_spec", None)
        mean = self.mean or (
            _three(spec.mean, "student mean") if spec is not None else IMAGENET_DEFAULT_MEAN
        )
        std = self.std or (
            _three(spec.std, "student std") if spec is not None else IMAGENET_DEFAULT_STD
        )
        return tuple(mean), tuple(std)

    def eval_transform(self) -> Callable[[Any], Tensor]:
        """timm's eval transform (resize, centre crop at ``crop_pct``) of a PIL image."""
        return self._transform(False)

    def _transform(self, train: bool) -> Callable[[Any], Tensor]:
        mean, std = self.normalisation()
        return timm_transform(
            train, self.image_size, augment=self.augment, mean=mean, std=std, **self.timm_options
        )

    def _train_transform(self) -> Callable[..., Tensor]:
        """The training transform: replayed (called as ``t(image, epoch, index)``) when
        ``replay`` and ``augment``, else timm's as it is."""
        transform = self._transform(True)
        if not (self.replay and self.augment):
            return transform
        mean, std = self.normalisation()
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.timm_options.items()}
        description = {
            "kind": "timm_create_transform",
            "timm": timm.__version__,  # another timm may draw differently
            "image_size": self.image_size,
            **options,
            "mean": list(mean),
            "std": list(std),
        }
        return ReplayTransform(transform, self.seed, description)

    def sample_augmentation(self) -> dict | None:
        """Description of the replayed training augmentation (``None`` when ``augment`` is
        off), for cache manifests; refused when it is not replayable."""
        if not self.augment:
            return None
        if not self.replay:
            raise ConfigError(
                f"{type(self).__name__} has replay: false, so its training augmentation "
                "cannot be replayed; set data.init_args.replay: true"
            )
        if self.train_set is None:
            raise ConfigError(f"{type(self).__name__}.augmentation() needs setup('fit') first")
        return self.train_set.transform.describe()

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(epoch_keys=self.replay)
