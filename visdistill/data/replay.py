"""Augmentations that can be replayed: parameters are a pure function of
``(seed, epoch, sample index)``, so the teacher-output cache can store targets for
exactly the crops and flips training will see (the FKD idea: Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler


class ReplayCropFlip:
    """Random crop of ``size`` from the image zero-padded by ``padding``, then a horizontal
    flip with probability 0.5; ``(C, H, W)`` uint8 in, same out.

    ``params(epoch, index)`` is deterministic (seeded by ``seed``, ``epoch`` and ``index``),
    so the same sample in the same epoch always gets the same crop and flip, whatever the
    shuffle order, worker or process.
    """

    def __init__(self, size: int, padding: int, seed: int = 0) -> None:
        self.size, self.padding, self.seed = int(size), int(padding), int(seed)

    def params(self, epoch: int, index: int) -> tuple[int, int, bool]:
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + int(epoch)) * 10_000_019 + int(index)
        )
        top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=g).tolist()
        flip = bool(torch.rand((), generator=g) < 0.5)
        return top, left, flip

    def __call__(self, img: Tensor, epoch: int, index: int) -> Tensor:
        top, left, flip = self.params(epoch, index)
        p = self.padding
        padded = F.pad(img, (p, p, p, p)) if p else img
        out = padded[..., top : top + self.size, left : left + self.size]
        return out.flip(-1) if flip else out

    def describe(self) -> dict:
        """What a cache must agree on to replay these augmentations."""
        return {"kind": "crop_flip", "size": self.size, "padding": self.padding, "seed": self.seed}


class EpochSampler(Sampler):
    """Yields ``(epoch, position)`` keys so the dataset knows which epoch's augmentation to
    apply, shuffled with a generator seeded by ``seed`` and the epoch.

    Lightning calls :meth:`set_epoch` before every training epoch. Under DDP, Lightning wraps
    this sampler in its distributed wrapper, which does not forward ``set_epoch``; the
    sampler then counts its own epochs (one per iteration), which matches as long as the
    run is not resumed mid-way under DDP.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, int(seed), 0
        self._told, self._iterated = False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._told = int(epoch), True

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._iterated and not self._told:
            self.epoch += 1
        self._told, self._iterated = False, True
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return self.n
