"""scikit-learn's digits: 1,797 8x8 gray images, 10 classes, always installed.

No test split ships with it; a seeded 20 % is held out as the test set, and validation
is carved from the rest, as for every other data set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ArrayDataModule, split_indices


class DigitsDataModule(ArrayDataModule):
    """Scikit-learn digits, upsampled to ``image_size`` (default 32) for fast tests."""

    num_classes = 10

    def __init__(self, test_fraction: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.test_fraction = test_fraction

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
        targets = torch.from_numpy(digits.target).long()
        train_idx, test_idx = split_indices(len(images), self.test_fraction, seed=1234)
        idx = train_idx if train else test_idx
        return images[idx].unsqueeze(1), targets[idx]
