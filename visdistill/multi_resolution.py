"""Multi-resolution training: the student sees each training step's batch at a size drawn
from a list, while every teacher keeps its own input size.

As in AM-RADIO (Ranzinger et al., CVPR 2024), a student trained at several resolutions
works at any of them. The teachers' targets do not change: each teacher still resizes the
canonical batch ``(B, 3, H, W)`` to its own size, and the terms that compare spatial maps
resample the student's map to the teacher's grid (AdaptorHeads, UNIC) or both maps to a
fixed grid (TRG); DisWOT compares ``(C, C)`` channel correlations and ``(B, B)`` batch
relations, which do not depend on the grid. Student and teachers see the same image
content, so positions on the resampled grids correspond.

A step's size is a function of a seed and the global step only, so a run is reproducible,
a resumed run draws what the uninterrupted run would have, and every DDP rank draws the
same size (ranks share the global step). Evaluation runs at the student's configured size.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from .errors import ConfigError
from .models import Backbone, fixed_input_size


def draw_student_size(sizes: Sequence[int], seed: int, step: int) -> int:
    """The student's input side at training step ``step``: one of ``sizes``, drawn uniformly
    by a generator seeded from ``(seed, step)`` (numpy's ``SeedSequence`` mixes both; the
    global RNGs are left alone). ``seed`` and ``step`` are non-negative."""
    return int(sizes[int(np.random.default_rng([int(seed), int(step)]).integers(len(sizes)))])


class StudentSizes:
    """The sizes a student trains at, checked against the student and the terms.

    Args:
        sizes: square input sides in pixels; one is drawn per training step.
        seed: seeds the draws (with the global step).
        student: the student; it must accept any input size (a CNN, or a ViT built with
            ``model_kwargs: {dynamic_img_size: true}``), and a ViT's patch size must divide
            every size unless it pads (``dynamic_img_pad: true``).
        terms: the module's terms; a term that builds layers for the student's configured
            grid (``fixed_student_grid``, e.g. OFA's token exits) is refused.
    """

    def __init__(
        self, sizes: Sequence[int], seed: int, student: Backbone, terms: Sequence[Any]
    ) -> None:
        sizes = list(sizes)
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise ConfigError(
                f"student_sizes must be a non-empty list of input sides in pixels (e.g. "
                f"[160, 192, 224]), got {sizes!r}"
            )
        if min(sizes) <= 0:
            raise ConfigError(f"student_sizes must be positive, got {sizes}")
        if int(seed) < 0:
            raise ConfigError(f"student_sizes_seed must be >= 0, got {seed}")
        self.sizes, self.seed = sizes, int(seed)
        _check_student(student, sizes)
        fixed = [type(t).__name__ for t in terms if getattr(t, "fixed_student_grid", False)]
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)} built layers for the student's configured grid, so the "
                "student cannot change size between steps (OFA's token exits merge patches "
                "of that grid); remove student_sizes, or give OFA branch: cnn (its exits "
                "pool any grid)"
            )

    def draw(self, step: int) -> int:
        """The size of training step ``step`` (:func:`draw_student_size`)."""
        return draw_student_size(self.sizes, self.seed, step)

    def preprocess(self, student: Backbone, images: Tensor, step: int) -> Tensor:
        """The student's input for a canonical batch ``(B, 3, H, W)`` in ``[0, 1]`` at step
        ``step``: resized to ``(S, S)`` with ``S`` :meth:`draw` ``(step)``, then normalised
        as the student's input spec says; ``(B, C, S, S)``."""
        side = self.draw(step)
        return dataclasses.replace(student.input_spec, size=(side, side)).apply(images)


def _check_student(student: Backbone, sizes: list[int]) -> None:
    model = student.model
    fixed = fixed_input_size(model, student.model_kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    if fixed is not None:
        fix = (
            "build it with model_kwargs: {dynamic_img_size: true} (timm's ViT family: "
            "vit_*, deit_*, eva_* ...)"
            if hasattr(patch_embed, "strict_img_size")
            and "dynamic_img_size" in _init_parameters(model)
            else "choose a student that accepts any size (a CNN, or a ViT with "
            "model_kwargs: {dynamic_img_size: true})"
        )
        raise ConfigError(
            f"student_sizes {sizes}: the student {student.name} runs at a fixed input size "
            f"{fixed[0]}x{fixed[1]}, so it cannot train at several sizes; {fix}"
        )
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    configured = student.input_spec.size
    if configured is None:
        # Evaluation runs at the configured size; the data's size may not fit the patches.
        raise ConfigError(
            f"student_sizes: the student {student.name} cuts images into {patch[0]}x"
            f"{patch[1]} patches, so give it the input_size it is evaluated at (a multiple of "
            f"{patch[0]}, e.g. input_size: {max(sizes)})"
        )
    bad = [s for s in sizes if s % patch[0] or s % patch[1]]
    bad += (
        [f"input_size {configured[0]}x{configured[1]}"]
        if configured[0] % patch[0] or (configured[1] % patch[1])
        else []
    )
    if bad:
        raise ConfigError(
            f"student_sizes: {', '.join(map(str, bad))} "
            f"{'is not a multiple' if len(bad) == 1 else 'are not multiples'} of the student's "
            f"patch size {patch[0]}x{patch[1]}; use multiples of it, or add dynamic_img_pad: "
            "true to the student's model_kwargs (pads each image to a multiple)"
        )


def _init_parameters(model: Any) -> set[str]:
    return set(inspect.signature(type(model).__init__).parameters)
