"""Image folders (``root/<class>/<image>``, or a flat ``root/<image>`` without labels), read
with PIL through torchvision."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataNotFoundError
from .augment import TimmAugmentDataModule
from .base import UNLABELLED, split_indices, subset, warn_large_subset
from .replay import apply_keyed


class FlatFolder:
    """The images directly in ``root`` (no class sub-folders), sorted by name, without labels:
    what :class:`ImageFolder` offers (``samples`` with target ``-1``, no ``classes``,
    ``loader``)."""

    def __init__(self, root: Path, images: list[Path]) -> None:
        self.root, self.classes, self.loader = root, [], load_image
        self.samples = [(str(p), UNLABELLED) for p in images]

    def __len__(self) -> int:
        return len(self.samples)


class _IndexedFolder(Dataset):
    """Samples ``indices`` of an image folder as canonical dict samples (``target`` ``-1``
    when ``labelled`` is false). Keys are positions, or :class:`EpochSampler`'s
    ``(epoch, position)`` for a replayed transform (samples then carry ``epoch``)."""

    def __init__(
        self,
        folder: ImageFolder | FlatFolder,
        indices: Tensor,
        transform: Callable[..., Tensor],
        labelled: bool = True,
    ) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        j = int(self.indices[key[1] if isinstance(key, tuple) else key])
        path, target = self.folder.samples[j]
        try:
            image = self.folder.loader(path)
        except Exception as e:
            raise DataNotFoundError(
                f"cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file."
            ) from e
        image, extra = apply_keyed(self.transform, image, key, j)
        return {
            "image": image,
            "target": torch.tensor(target if self.labelled else UNLABELLED),
            "index": torch.tensor(j),
            **extra,
        }


def load_image(path: str) -> Image.Image:
    """An RGB PIL image, 8 bits per channel (see :func:`to_rgb`)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return to_rgb(image)


def decode_image(data: bytes) -> Image.Image:
    """An RGB PIL image from an encoded file's bytes (PNG, JPEG, ...; see :func:`to_rgb`)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, 8 bits per channel. 16-bit grayscale PNG/TIFF (PIL modes ``I;16*``
    and ``I``) and float images (``F``, taken as ``[0, 1]``) are scaled by their bit depth;
    PIL's own ``convert("RGB")`` clips them at 255, so 1000 and 30000 both became white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or values.max(initial=0) <= 65535 else 2.0**32 - 1
        image = Image.fromarray(np.rint(values.clip(0, top) * (255.0 / top)).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64).clip(0.0, 1.0)
        image = Image.fromarray(np.rint(values * 255.0).astype(np.uint8))
    return image.convert("RGB")


def _empty_class_folders(path: Path) -> list[str]:
    """Class sub-folders of ``path`` with no file ImageFolder would read."""
    return [
        d.name
        for d in sorted(path.iterdir())
        if d.is_dir()
        and not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in d.rglob("*"))
    ]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMG_EXTENSIONS)


def _flat_images(path: Path, role: str) -> list[Path] | None:
    """The images directly in ``path`` when it is a flat folder (images, no class
    sub-folders holding images), else ``None``; a folder holding both is an error."""
    images = sorted(p for p in path.iterdir() if _is_image(p))
    if not images:
        return None
    empty = set(_empty_class_folders(path))
    classes = [d.name for d in sorted(path.iterdir()) if d.is_dir() and d.name not in empty]
    if classes:
        raise DataNotFoundError(
            f"{role} {path.resolve()} holds both images ({images[0].name}, ...) and class "
            f"sub-folders ({', '.join(classes[:5])}); put every image in a class folder "
            "(labelled data), or every image directly in the folder (data without labels)"
        )
    return images


def align_classes(folder: ImageFolder | FlatFolder, classes: list[str], role: str) -> None:
    """Give ``folder``'s samples the label each class name has in the training folder
    (``classes``). ImageFolder numbers the class folders it finds, so a test folder lacking
    one class would shift every later label silently; a class the training folder lacks is
    refused."""
    if list(folder.classes) == list(classes):
        return
    if not folder.classes:
        raise DataNotFoundError(
            f"{role} {folder.root} has no class sub-folders, but the training folder is labelled "
            f"({len(classes)} classes): put its images in class folders named as in training"
        )
    unknown = sorted(set(folder.classes) - set(classes))
    if unknown:
        raise DataNotFoundError(
            f"{role} {folder.root} has class folders the training folder lacks: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; the model "
            f"predicts only the training folder's {len(classes)} classes ({', '.join(classes[:5])}"
            f"{' ...' if len(classes) > 5 else ''}). Rename or remove them"
        )
    index = {name: i for i, name in enumerate(classes)}
    relabel = [index[name] for name in folder.classes]
    folder.samples = [(path, relabel[target]) for path, target in folder.samples]
    if hasattr(folder, "targets"):
        folder.targets = [target for _, target in folder.samples]
    if hasattr(folder, "imgs"):
        folder.imgs = folder.samples
    folder.classes, folder.class_to_idx = list(classes), index


def open_folder(path: Path, role: str) -> ImageFolder | FlatFolder:
    """An :class:`ImageFolder` of ``<path>/<class>/<image>``, or a :class:`FlatFolder` of
    ``<path>/<image>`` (data without labels)."""
    if not path.is_dir():
        raise DataNotFoundError(f"{role} directory not found: {path.resolve()}")
    flat = _flat_images(path, role)
    if flat is not None:
        return FlatFolder(path, flat)
    try:
        return ImageFolder(str(path), loader=load_image)
    except FileNotFoundError as e:
        empty = _empty_class_folders(path)
        classes = [d for d in path.iterdir() if d.is_dir()]
        if empty and len(empty) < len(classes):
            raise DataNotFoundError(
                f"{role} class folder(s) {empty} in {path.resolve()} hold no images "
                f"({' '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)"
            ) from e
        raise DataNotFoundError(
            f"{role} directory {path.resolve()} holds no images in class sub-folders "
            f"(expected {path}/<class>/<image>.jpg): {e}"
        ) from e


class ImageFolderDataModule(TimmAugmentDataModule):
    """A data set laid out as ``<dir>/<class>/<image>``, or, without labels, as
    ``<dir>/<image>``.

    A flat ``train_dir`` (images directly in it, no class sub-folders) has no labels:
    every ``target`` is ``-1`` (label-free distillation), as with ``labels: false`` on a
    folder with classes. Without training labels every split is read without labels, so
    ``val_dir`` / ``test_dir`` may be flat too.

    Args:
        train_dir: training images; validation is carved from it unless ``val_dir``.
        val_dir: optional separate validation images.
        test_dir: optional test images (needed for ``visdistill test``).
        **kwargs: timm's augmentation options (``scale``, ``auto_augment``, ``re_prob``,
            ...; see :class:`~visdistill.data.augment.TimmAugmentDataModule`) and
            :class:`~visdistill.data.base.VisionDataModule`'s (``labels``, ...).

    Train images get timm's ``create_transform`` augmentation when ``augment``
    (RandomResizedCrop, flip, colour jitter by default); evaluation images are resized to
    ``image_size / crop_pct`` and centre-cropped to ``image_size``.
    """

    def __init__(
        self, train_dir: str, val_dir: str | None = None, test_dir: str | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.train_dir = Path(train_dir)
        self.val_dir = Path(val_dir) if val_dir else None
        self.test_dir = Path(test_dir) if test_dir else None
        self.classes = list(open_folder(self.train_dir, "train_dir").classes)
        self.num_classes = len(self.classes)

    def _indexed(self, folder, indices: Tensor, train: bool) -> _IndexedFolder:
        transform = self._train_transform() if train else self.eval_transform()
        return _IndexedFolder(folder, indices, transform, self.has_labels)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            train = open_folder(self.train_dir, "train_dir")
            if self.val_dir is not None:
                val = open_folder(self.val_dir, "val_dir")
                if self.has_labels:
                    align_classes(val, train.classes, "val_dir")
                if self.train_subset is not None:
                    warn_large_subset(self.train_subset, len(train))
                train_idx = subset(len(train), self.train_subset, self.seed)
                val_idx, val_src = torch.arange(len(val)), val
            else:
                train_idx, val_idx = split_indices(
                    len(train), self.val_split, self.seed, self.train_subset
                )
                val_src = train
            self.train_set = self._indexed(train, train_idx, train=True)
            self.val_set = self._indexed(val_src, val_idx, train=False)
        if stage in (None, "test", "predict") and self.test_set is None:
            if self.test_dir is None:
                raise DataNotFoundError("no test_dir configured (data.init_args.test_dir)")
            test = open_folder(self.test_dir, "test_dir")
            if self.has_labels:
                align_classes(test, self.classes, "test_dir")
            idx = subset(len(test), self.test_subset, self.seed)
            self.test_set = self._indexed(test, idx, train=False)
