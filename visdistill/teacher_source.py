"""Where a training step's teacher outputs come from: the teachers themselves, or a cache.

:class:`TeacherSource` is one interface with two implementations, so
:class:`~visdistill.DistillationModule` and the distillation terms never ask which one they
have:

- :class:`LiveTeachers` runs a :class:`~visdistill.teachers.TeacherEnsemble` on the batch's
  images (eval mode, ``torch.no_grad()``, optionally under bf16 autocast), with the stages
  and pooled features the terms asked for.
- :class:`CachedTeachers` reads the outputs a ``visdistill cache`` build stored for the
  batch's samples (``index``) and epoch (:mod:`visdistill.teacher_cache`): top-``k``
  log-probabilities and, when the cache holds them, pooled features and stage feature maps.

A source takes the batch dict a data module yields (``image`` ``(B, 3, H, W)`` in
``[0, 1]``, ``target`` ``(B,)``, ``index`` ``(B,)``, optionally ``epoch`` ``(B,)``) and
returns one :class:`~visdistill.models.ModelOutput` per teacher, in the ensemble's order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import ConfigError
from .models import ModelOutput

if TYPE_CHECKING:
    from .teacher_cache import TeacherCache
    from .teachers import TeacherEnsemble

TEACHER_PRECISIONS = ("auto", "bf16", "32")


@runtime_checkable
class TeacherSource(Protocol):
    """Something that gives the teachers' outputs for a batch."""

    def outputs(self, batch: Mapping[str, Tensor], epoch: int = 0) -> list[ModelOutput]:
        """One :class:`ModelOutput` per teacher for ``batch``.

        Args:
            batch: the data module's batch: ``image`` ``(B, 3, H, W)``, ``target`` ``(B,)``,
                ``index`` ``(B,)`` and, where the data yields it, ``epoch`` ``(B,)``.
            epoch: the training epoch the batch belongs to (read by sources whose outputs
                depend on the epoch's augmentation when the batch has no ``epoch`` key).
        """
        ...


def check_teacher_precision(precision: str) -> None:
    if precision not in TEACHER_PRECISIONS:
        raise ConfigError(f"teacher_precision must be 'auto', 'bf16' or '32', got {precision!r}")


def teacher_autocast(precision: str, device_type: str) -> AbstractContextManager:
    """bf16 autocast for ``"bf16"``, and for ``"auto"`` on CUDA; a disabled autocast (fp32)
    otherwise. Frozen teachers lose nothing that matters to a soft target in bf16."""
    bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16)


class LiveTeachers:
    """Run the teachers on every batch.

    Holds a reference to the ensemble, not a copy: the ensemble stays registered (and
    checkpointed) where its owner keeps it, and ``.to()`` / ``compile()`` on it apply here.

    Args:
        ensemble: the frozen teachers.
        stages: stage indices to return, one tuple for all teachers or one per teacher.
        pooled: also return each teacher's pooled features ``(B, D)``.
        precision: ``"auto"``, ``"bf16"`` or ``"32"`` (see :func:`teacher_autocast`).
    """

    def __init__(
        self,
        ensemble: TeacherEnsemble,
        stages: Sequence[tuple[int, ...]] | tuple[int, ...] = (),
        pooled: bool = False,
        precision: str = "auto",
    ) -> None:
        check_teacher_precision(precision)
        self.ensemble, self.stages, self.pooled = ensemble, stages, pooled
        self.precision = precision

    def autocast(self, images: Tensor) -> AbstractContextManager:
        """The teachers' autocast context for a batch on ``images``' device."""
        return teacher_autocast(self.precision, images.device.type)

    def outputs(self, batch: Mapping[str, Tensor], epoch: int = 0) -> list[ModelOutput]:
        images = batch["image"]
        with self.autocast(images):
            return self.ensemble(images, stages=self.stages, pooled=self.pooled)


class CachedTeachers:
    """Read the teachers' outputs from a teacher cache instead of running them.

    ``logits`` are the cached log-probabilities ``(B, K)`` (the top ``k`` exact, the rest
    sharing the remaining mass; ``None`` for a headless teacher), ``pooled`` the cached
    features ``(B, D)`` and ``stages`` the cached feature maps ``{stage: (B, C, h, w)}``
    (under the indices the terms ask for, ``-1`` included) when the cache holds them.
    Outputs are on the device of the batch's ``index``.

    Args:
        cache: an opened :class:`~visdistill.teacher_cache.TeacherCache`.
        stages: per teacher, the stage indices the terms read (default: none).
    """

    def __init__(
        self, cache: TeacherCache, stages: Sequence[tuple[int, ...]] | None = None
    ) -> None:
        self.cache = cache
        self.stages = [tuple(s) for s in stages] if stages is not None else None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        module: Any,
        datamodule: Any,
        max_epochs: int | None,
        needs_pooled: bool = False,
        stages: Sequence[tuple[int, ...]] | None = None,
        world_size: int | None = None,
    ) -> CachedTeachers:
        """Open the cache at ``path`` and refuse it unless it was built for ``module``'s
        teachers, ``datamodule``'s data, augmentation (and, with mixup, batching over
        ``world_size`` processes) and at least ``max_epochs`` epochs, and holds pooled
        features when ``needs_pooled`` and every stage in ``stages`` (per teacher)."""
        from .teacher_cache import TeacherCache

        cache = TeacherCache.open(path)
        cache.check(module, datamodule, max_epochs, world_size)
        names = [t.name for t in module.teachers]
        cache.check_contents(stages or [()] * len(names), needs_pooled, names)
        return cls(cache, stages)

    @staticmethod
    def check_usable(
        teachers: TeacherEnsemble | None,
        terms: Sequence[Any],
        path: str | os.PathLike | None = None,
        stages: Sequence[tuple[int, ...]] = (),
        needs_pooled: bool = False,
    ) -> None:
        """Refuse, at construction, a set-up the cache cannot serve: no teachers, terms that
        read the teachers' raw logits, and (when the cache at ``path`` is already built) a
        cache without the pooled features or a stage the terms read."""
        if teachers is None:
            raise ConfigError(
                "the teacher cache stores the teachers' outputs, but the model has no "
                "teachers: remove teacher_cache"
            )
        raw = [type(t).__name__ for t in terms if t.needs_teacher_logits]
        if raw:
            raise ConfigError(
                f"{', '.join(raw)} read the teachers' logits (MEALV2: disc_input "
                "logit_mean), but the teacher cache stores top-k log-probabilities, whose "
                "mean is not the mean logit; use disc_input: prob, or remove teacher_cache"
            )
        manifest = _built_manifest(path)
        if manifest is not None:
            from .teacher_cache import missing_stages

            missing_stages(manifest, path, stages, needs_pooled, [t.name for t in teachers])

    def outputs(self, batch: Mapping[str, Tensor], epoch: int = 0) -> list[ModelOutput]:
        index = batch["index"]
        outs = self.cache.lookup(batch.get("epoch", epoch), index, index.device)
        if self.stages is None:
            return outs
        counts = self.cache.manifest["stage_counts"]
        for out, own, n in zip(outs, self.stages, counts, strict=True):
            stored = out.stages
            out.stages = {s: stored[s % n] for s in own}
        return outs


def _built_manifest(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The manifest of the (current-format) cache at ``path``; ``None`` while it is not
    built yet (the cache command may build it after the model is made)."""
    import json

    from .teacher_cache import FORMAT_VERSION, MANIFEST

    if path is None:
        return None
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        return None  # refused with its reason when fit opens it
    return manifest
