"""One pass of frozen models over a data loader: eval mode, ``torch.no_grad()``, one
progress bar, optionally this process's share of the data under DDP.

Used wherever teachers or a finished model run over a whole split outside the training loop
(the teacher cache build, ND's class means, zoo evaluation), so each caller keeps only
what it does with the outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

T = TypeVar("T")
Batch = dict[str, Any]


def shard_loader(loader: DataLoader, rank: int, world_size: int, dataset: Any = None) -> DataLoader:
    """``loader``'s dataset (or ``dataset``, e.g. a copy of it with another transform) cut to
    every ``world_size``-th sample from ``rank`` (no padding: the ranks' shares together are
    the data set exactly once), in a new loader with ``loader``'s batch size, workers and
    collate function; in order, unshuffled."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    dataset = loader.dataset if dataset is None else dataset
    return DataLoader(
        Subset(dataset, list(range(rank, len(dataset), world_size))),
        batch_size=loader.batch_size or 256,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


def training_loader(trainer: Any, owner: str) -> DataLoader:
    """The loader ``trainer.fit`` trains on, for a pass over the data in ``on_fit_start``
    (ND's class means, AdaptorHeads' normaliser statistics); ``owner`` names who needs it
    in the error when there is none."""
    from .errors import ConfigError
    from .lightning_private import fit_train_dataloader

    loader = fit_train_dataloader(trainer)
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            f"{owner} needs the training DataLoader at fit start; use a LightningDataModule "
            "or pass one DataLoader to trainer.fit"
        )
    return loader


def stop_workers(loader: Any) -> None:
    """Stop a DataLoader's persistent worker processes now. Left alive, they are shut down at
    a later garbage collection, which then stalls whatever runs at that moment (10-20 s
    measured in the test suite); Lightning stops a fit's loaders the same way at its end.
    A loader without workers, or not yet iterated, is left as it is."""
    iterator = getattr(loader, "_iterator", None)  # torch keeps persistent workers there
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def batch_limit(limit: int | float | None, n_batches: int) -> int | None:
    """Batches of a pass at fit start under the trainer's ``limit_train_batches`` (which
    ``fast_dev_run=N`` sets to ``N``): ``None`` for all of them."""
    if limit is None or isinstance(limit, bool):
        return None
    if isinstance(limit, int):
        return limit if limit < n_batches else None
    if limit < 1.0:
        return max(1, int(n_batches * limit))
    return None


def _to(batch: Batch, device: Any) -> Batch:
    if device is None:
        return batch
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _images_in(batches: Iterable[Batch], max_batches: int | None) -> int | None:
    """The number of samples the pass will see, when the loader can tell."""
    if not isinstance(batches, DataLoader):
        return None
    try:
        n = len(batches.sampler) if batches.batch_sampler is not None else len(batches.dataset)
    except TypeError:  # an iterable dataset without a length
        return None
    if max_batches is not None and batches.batch_size:
        n = min(n, max_batches * batches.batch_size)
    return n


def _size(batch: Batch) -> int:
    first = batch.get("image", next(iter(batch.values())))
    return len(first)


@torch.no_grad()
def run_over_loader(
    model: nn.Module,
    batches: Iterable[Batch],
    forward: Callable[[nn.Module, Batch], T] | None = None,
    *,
    device: Any = None,
    desc: str = "",
    progress: bool = True,
    total: int | None = None,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    leave: bool = True,
) -> Iterator[tuple[Batch, T]]:
    """Yield ``(batch, output)`` for every batch of ``batches``, ``model`` in eval mode under
    ``torch.no_grad()``, with one progress bar counting samples.

    The model's modules get their train/eval flags back when the pass ends (or is
    abandoned), so a student evaluated mid-training goes on training. The caller's code
    between two batches runs with its own grad mode.

    Args:
        model: the models, as one module (a :class:`~visdistill.teachers.TeacherEnsemble`,
            a :class:`~visdistill.models.Backbone` ...).
        batches: a :class:`~torch.utils.data.DataLoader` or any iterable of batch dicts
            (``image`` ``(B, 3, H, W)``, ``target`` ``(B,)``, ``index`` ``(B,)``, ...).
        forward: ``(model, batch) -> output``; default ``model(batch["image"])``.
        device: move the batch's tensors there first (``None``: leave them).
        desc: the progress bar's label.
        progress: show the bar (only ever on ``rank`` 0).
        total: samples in the pass, for the bar; default from the loader when it knows.
        max_batches: stop after this many batches (a shortened debugging pass).
        rank, world_size: with ``world_size > 1`` this process takes every
            ``world_size``-th sample from ``rank`` (:func:`shard_loader`; ``batches`` must
            be a DataLoader); the caller all-reduces what it accumulates.
        leave: keep the finished bar on screen.
    """
    if world_size > 1:
        if not isinstance(batches, DataLoader):
            raise TypeError(
                "run_over_loader shards a DataLoader only; got " + type(batches).__name__
            )
        batches = shard_loader(batches, rank, world_size)
    if total is None:
        total = _images_in(batches, max_batches)
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    forward = forward or (lambda m, b: m(b["image"]))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", leave=leave, disable=not progress or rank != 0)
    try:
        for batch in batches:
            batch = _to(batch, device)
            out = forward(model, batch)
            yield batch, out
            bar.update(_size(batch))
    finally:
        bar.close()
        for module, mode in modes:  # the flags as they were (Teacher.train() ignores modes)
            module.training = mode
