"""Augmentations that can be replayed: parameters are a pure function of
``(seed, epoch, sample index)``, so the teacher-output cache can store targets for
exactly the crops and flips training will see (the FKD idea: Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022).

:class:`ReplayCropFlip` is the in-memory sets' crop and flip; :class:`ReplayTransform`
makes any transform (timm's ``create_transform`` pipelines) replayable by running it under
:func:`replayed_rng`; :class:`EpochSampler` hands the dataset its ``(epoch, index)`` keys.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler, Sampler


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

    Lightning calls :meth:`set_epoch` before every training epoch. Without it (a plain
    loop, or a wrapper that does not forward it) the sampler counts its own epochs, one per
    iteration.

    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th position of the
    epoch's order, starting at ``rank`` (padded by repeating the first positions so every
    rank gets the same count, as :class:`~torch.utils.data.DistributedSampler` does). The
    ranks' ``t``-th batches of ``B`` together are then exactly the single-process ``t``-th
    batch of ``num_replicas * B``. Build it with :func:`epoch_sampler` so Lightning does not
    shard it a second time.

    Args:
        n: dataset size.
        shuffle: a new seeded permutation per epoch (else ``0 .. n-1``).
        seed: shuffle seed (the training run's seed).
        num_replicas, rank: the process's share under DDP.
        epoch_keys: yield ``(epoch, position)`` (replayable augmentation); ``False`` yields
            plain positions, for datasets that take an ``int``.
    """

    def __init__(
        self,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_keys: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, int(seed), 0
        self.num_replicas, self.rank, self.epoch_keys = int(num_replicas), int(rank), epoch_keys
        self._told, self._iterated = False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._told = int(epoch), True

    def order(self, epoch: int) -> list[int]:
        """This rank's positions in ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + int(epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.num_replicas > 1 and order:
            total = len(self) * self.num_replicas
            order = (order * -(-total // len(order)))[:total][self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]] | Iterator[int]:
        if self._iterated and not self._told:
            self.epoch += 1
        self._told, self._iterated = False, True
        order = self.order(self.epoch)
        if not self.epoch_keys:
            return iter(order)
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)


class _ShardedEpochSampler(EpochSampler, DistributedSampler):
    """An :class:`EpochSampler` that shards itself; a ``DistributedSampler`` only so that
    Lightning uses it as it is instead of wrapping it in its own distributed sampler
    (``DistributedSampler.__init__`` is not called: every method comes from
    :class:`EpochSampler`)."""


def epoch_sampler(
    n: int, seed: int, num_replicas: int = 1, rank: int = 0, epoch_keys: bool = True
) -> EpochSampler:
    """A shuffling :class:`EpochSampler`, sharded over ``num_replicas`` processes when
    there are several."""
    cls = _ShardedEpochSampler if num_replicas > 1 else EpochSampler
    return cls(n, True, seed, num_replicas, rank, epoch_keys)


# Replayable random draws for any transform --------------------------------------------
#
# timm's and torchvision's transforms draw from the global RNGs: python ``random``
# (RandAugment's op choice and magnitudes, RandomErasing's boxes), numpy (timm's Mixup) and
# torch's CPU generator (RandomResizedCrop, flips, colour jitter, erasing noise). Seeding all
# three from the sample's key just before the transform and putting them back afterwards
# makes every draw a function of that key alone: the same in any worker, process or order,
# while the caller's random streams go on as if nothing had happened.


def replay_entropy(*key: int) -> list[int]:
    """128 bits of entropy from the integers ``key`` (e.g. ``(seed, epoch, index)``):
    numpy's :class:`~numpy.random.SeedSequence`, stable across processes, platforms and
    Python runs (unlike ``hash()``, which Python salts per process)."""
    if any(int(k) < 0 for k in key):
        raise ValueError(f"replay keys are non-negative integers, got {key}")
    return np.random.SeedSequence([int(k) for k in key]).generate_state(4).tolist()


@contextlib.contextmanager
def replayed_rng(*key: int) -> Iterator[None]:
    """Seed python ``random``, numpy's global RNG and torch's CPU generator from ``key``
    (see :func:`replay_entropy`) for the body, then restore all three as they were.

    Everything the body draws from those generators is a pure function of ``key``. CUDA
    generators are neither read nor touched (transforms run on CPU, in loader workers).
    """
    words = replay_entropy(*key)
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    try:
        random.seed(sum(w << (32 * i) for i, w in enumerate(words)))
        np.random.seed(np.array(words, dtype=np.uint32))
        torch.default_generator.manual_seed((words[0] << 32) | words[1])
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ReplayTransform:
    """Any per-sample transform (timm's ``create_transform`` pipeline, a torchvision
    ``Compose``, ...) made replayable: ``transform(image, epoch, index)`` runs it under
    :func:`replayed_rng` keyed by ``(seed, epoch, index)``, so the crop box, flips,
    RandAugment ops and magnitudes, colour jitter and erasing boxes of sample ``index`` in
    ``epoch`` are the same in every call, worker and process.

    Args:
        transform: the transform; it must draw only from python ``random``, numpy's global
            RNG and torch's default CPU generator (timm's and torchvision's do).
        seed: the data seed.
        description: what a teacher cache must agree on to replay it (its options; see
            :meth:`describe`).
    """

    def __init__(
        self, transform: Callable[[Any], Tensor], seed: int, description: dict | None = None
    ) -> None:
        self.transform, self.seed = transform, int(seed)
        self.description = dict(description or {"transform": repr(transform)})

    def __call__(self, image: Any, epoch: int, index: int) -> Tensor:
        with replayed_rng(self.seed, epoch, index):
            return self.transform(image)

    def describe(self) -> dict:
        """What a cache must agree on to replay these augmentations."""
        return {"kind": "replayed", "seed": self.seed, **self.description}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, transform={self.transform!r})"


def apply_keyed(
    transform: Callable[..., Tensor] | None, image: Any, key: int | tuple[int, int], index: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """``transform`` applied to dataset sample ``index`` fetched with ``key`` (an
    :class:`EpochSampler` ``(epoch, position)`` key, or a plain position taken as epoch 0):
    a :class:`ReplayTransform` gets ``(image, epoch, index)``, any other transform the image
    alone. Returns the image and the extra sample fields (``epoch`` for ``(epoch, position)``
    keys)."""
    epoch = key[0] if isinstance(key, tuple) else 0
    if isinstance(transform, ReplayTransform):
        image = transform(image, epoch, index)
    elif transform is not None:
        image = transform(image)
    return image, ({"epoch": torch.tensor(epoch)} if isinstance(key, tuple) else {})
