"""A training DataLoader whose position inside an epoch is saved in Lightning checkpoints.

Lightning 2.6 saves ``state_dict()`` of every training DataLoader that has one (with
``load_state_dict``) under ``loops.fit_loop.state_dict.combined_loader`` and loads it back
before the first ``iter()`` when a fit resumes mid-epoch. A plain DataLoader has none, so
a mid-epoch resume replays the epoch from its first batch (Lightning warns: "your
dataloader is not resumable"). :class:`ResumableDataLoader` records the shuffle seed, the
epoch and the number of batches it has handed out; on resume it skips that many batches
of the *index* stream (no image is loaded for them) and continues with the next one.

Lightning's fetcher does not prefetch from loaders with a length, so at
``on_train_batch_end`` of batch ``k`` the count is exactly ``k + 1``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from ..errors import CheckpointError
from .replay import EpochSampler


def _epoch_sampler(sampler: Any) -> EpochSampler | None:
    """The :class:`EpochSampler` of a loader, also inside Lightning's distributed wrapper."""
    for candidate in (sampler, getattr(getattr(sampler, "dataset", None), "_sampler", None)):
        if isinstance(candidate, EpochSampler):
            return candidate
    return None


class _SkipFirst:
    """The loader's batch index sampler, minus the batches a resumed epoch already did; its
    length stays the full epoch's, as Lightning expects."""

    def __init__(self, base: Any, loader: ResumableDataLoader) -> None:
        self.base, self.loader = base, loader

    def __iter__(self) -> Iterator[Any]:
        # Read, not consumed: with workers torch iterates this twice while building the
        # iterator (__init__ and _reset); the loader clears the skip once it is built.
        return itertools.islice(iter(self.base), self.loader._skip, None)

    def __len__(self) -> int:
        return len(self.base)


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` that Lightning can resume mid-epoch.

    ``state_dict()`` is ``{"batches", "epoch", "seed", "num_batches", "batch_size"}``:
    batches yielded in the current epoch, and the :class:`EpochSampler`'s epoch and seed
    (so the order is the same even if the resumed process was seeded differently).
    ``load_state_dict`` refuses a state saved with another batch size or epoch length
    (other data, subset or batch size), naming both values.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches, self._skip = 0, 0

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:
        self._batches = self._skip
        try:
            iterator = super().__iter__()
        finally:
            self._skip = 0  # the resumed epoch only (persistent workers re-iterate later)
        return self._count(iterator)

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = _epoch_sampler(self.sampler)
        return {
            "batches": self._batches,
            "epoch": sampler.epoch if sampler is not None else None,
            "seed": sampler.seed if sampler is not None else None,
            "num_batches": len(self),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = {"batch_size": self.batch_size, "num_batches": len(self)}
        for key, now in current.items():
            if state.get(key) is not None and state[key] != now:
                raise CheckpointError(
                    f"cannot resume mid-epoch: the checkpoint's training loader had "
                    f"{key}={state[key]}, this run's has {now} (another batch size, data "
                    "subset or number of processes). Resume with the same data settings, or "
                    "start from the checkpoint's weights without ckpt_path (export it first)"
                )
        sampler = _epoch_sampler(self.sampler)
        if sampler is not None and state.get("epoch") is not None:
            sampler.seed = int(state["seed"])
            sampler.set_epoch(int(state["epoch"]))
        done = int(state.get("batches", 0))
        # A checkpoint taken after the epoch's last batch: Lightning starts the next epoch.
        self._skip = done if done < len(self) else 0
