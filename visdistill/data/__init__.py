"""LightningDataModules yielding canonical ``{"image", "target", "index"}`` batches."""

from .base import ArrayDataModule, VisionDataModule, split_indices
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .folder import ImageFolderDataModule
from .torchvision_sets import CIFARDataModule

__all__ = [
    "ArrayDataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "VisionDataModule",
    "split_indices",
]
