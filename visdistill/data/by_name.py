"""Data sets named on a command line: ``digits``, ``fashion_mnist`` or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataNotFoundError
from .base import VisionDataModule

#: The data sets visdistill loads by name without a download (canonical spellings).
NAMED_DATASETS = ("digits", "fashion_mnist")
_ALIASES = {"fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist"}


def dataset_name(name: str) -> str:
    """The canonical spelling of a named data set (``fashion-mnist`` -> ``fashion_mnist``);
    any other string (an image folder) comes back unchanged."""
    return _ALIASES.get(name, name)


def datamodule_by_name(name: str, folder_as_test: bool = False, **kwargs: Any) -> VisionDataModule:
    """The data module for ``name``: ``digits``, ``fashion_mnist`` (also ``fashion-mnist``)
    or an image folder (class sub-folders) used as the training split, and also as the test
    split with ``folder_as_test``. ``kwargs`` go to the data module (``image_size``,
    ``test_subset`` ...)."""
    from .digits import DigitsDataModule
    from .fashion_mnist import FashionMNISTDataModule
    from .folder import ImageFolderDataModule

    canonical = dataset_name(name)
    if canonical == "digits":
        return DigitsDataModule(**kwargs)
    if canonical == "fashion_mnist":
        return FashionMNISTDataModule(**kwargs)
    if Path(name).is_dir():
        folders = {"train_dir": name, "test_dir": name if folder_as_test else None}
        return ImageFolderDataModule(**folders, **kwargs)
    raise DataNotFoundError(
        f"data {name!r} is neither a named data set ({', '.join(NAMED_DATASETS)}) nor an image "
        f"folder (no directory at {Path(name).resolve()}); give one of those names or a folder "
        "with one sub-folder per class"
    )
