"""CIFAR-10 / CIFAR-100 through a torchvision root (downloaded only when asked)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataNotFoundError
from .base import ArrayDataModule


class CIFARDataModule(ArrayDataModule):
    """CIFAR-10 or CIFAR-100 (Krizhevsky, 2009), 32x32 colour.

    Args:
        root: torchvision root holding ``cifar-10-batches-py`` / ``cifar-100-python``.
        variant: ``"cifar10"`` or ``"cifar100"``.
        download: let torchvision download into ``root`` when missing.
    """

    def __init__(
        self, root: str = "data", variant: str = "cifar10", download: bool = False, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if variant not in ("cifar10", "cifar100"):
            raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
        self.root, self.variant, self.download = Path(root), variant, download
        self.num_classes = 10 if variant == "cifar10" else 100

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if self.variant == "cifar10" else CIFAR100
        try:
            ds = cls(str(self.root), train=train, download=self.download)
        except RuntimeError as e:
            raise DataNotFoundError(
                f"{self.variant} not found under {self.root.resolve()} ({e}). Put torchvision's "
                f"extracted {cls.base_folder} folder there, or set `download: true`."
            ) from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.long)
