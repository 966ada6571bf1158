"""Fashion-MNIST (Xiao, Rasul, Vollgraf, 2017): 60k train + 10k test, 28x28 gray, 10 classes.

Looked for, in order: Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), then a torchvision root. Downloads only when
``download=True``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataNotFoundError
from .base import ArrayDataModule

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def read_idx(path: Path, offset: int) -> np.ndarray:
    """Raw bytes of an idx file (``.gz`` or not) after its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


class FashionMNISTDataModule(ArrayDataModule):
    """Fashion-MNIST, padded from 28 to 32 px (stride-32 models need >= 32) and served
    as canonical 3-channel images.

    Args:
        root: torchvision root (holding ``FashionMNIST/raw``), used when Debian's files
            are absent, and where ``download=True`` writes.
        download: let torchvision download the data into ``root`` if it is not found.
        **kwargs: see :class:`~visdistill.data.base.VisionDataModule`.
    """

    num_classes = 10
    classes = CLASSES

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.download = Path(root), download

    def _find(self, stem: str) -> Path | None:
        for folder in (DEBIAN_DIR, self.root / "FashionMNIST" / "raw", self.root):
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    return folder / name
        return None

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        prefix = "train" if train else "t10k"
        images_path = self._find(f"{prefix}-images-idx3-ubyte")
        labels_path = self._find(f"{prefix}-labels-idx1-ubyte")
        if (images_path is None or labels_path is None) and self.download:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.root), train=train, download=True)
            images_path = self._find(f"{prefix}-images-idx3-ubyte")
            labels_path = self._find(f"{prefix}-labels-idx1-ubyte")
        if images_path is None or labels_path is None:
            raise DataNotFoundError(
                f"Fashion-MNIST {prefix} files not found in {DEBIAN_DIR} nor under "
                f"{self.root.resolve()}. Either install Debian's package "
                "(`apt-get install dataset-fashion-mnist`), or set `download: true` "
                "(data.init_args.download) to fetch it with torchvision into `root`."
            )
        images = torch.from_numpy(read_idx(images_path, 16).reshape(-1, 1, 28, 28).copy())
        targets = torch.from_numpy(read_idx(labels_path, 8).astype(np.int64))
        # Pad rather than resize: the items keep their exact pixels, centred in 32 px.
        return F.pad(images, (2, 2, 2, 2)), targets
