"""LightningDataModules yielding canonical ``{"image", "target", "index"}`` batches."""

from .augment import TimmAugmentDataModule, timm_transform
from .base import ArrayDataModule, VisionDataModule, split_indices
from .digits import DigitsDataModule
from .fashion_mnist import FashionMNISTDataModule
from .folder import ImageFolderDataModule
from .shards import ShardsDataModule, convert_image_folder
from .torchvision_sets import CIFARDataModule

__all__ = [
    "ArrayDataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ShardsDataModule",
    "TimmAugmentDataModule",
    "VisionDataModule",
    "convert_image_folder",
    "split_indices",
    "timm_transform",
]
