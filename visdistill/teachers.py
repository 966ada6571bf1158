"""Frozen teachers: each a :class:`~visdistill.models.Backbone` that never trains.

A teacher's parameters have ``requires_grad=False``, ``train()`` cannot take it out of
eval mode (BatchNorm statistics and dropout stay fixed while the student trains), and
its outputs are produced under ``torch.no_grad()``. Not ``inference_mode``: its tensors
cannot be saved for the backward pass of the student's losses.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .models import Backbone, InputSpec, ModelConfig, ModelOutput

ENSEMBLE = "ensemble"  # the metric name of the teachers' averaged prediction


class Teacher(Backbone):
    """A :class:`Backbone` frozen by construction (same arguments)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.new_head:
            problem = (
                f"teacher {self.name}: its weights have a {self.weights_classes}-class "
                f"classifier, so with num_classes {self.num_classes} it gets a new, randomly "
                "initialised one, and a frozen teacher with a random classifier gives noise "
                "as soft targets"
            )
            if not self.allow_new_head:
                raise ConfigError(
                    f"{problem}. Fine-tune it on your classes first (train it as the student of "
                    "a teacher recipe and use its checkpoint), or set allow_new_head: true in "
                    "the teacher's config if only its features are distilled"
                )
            warnings.warn(f"{problem} (allow_new_head: true)", UserWarning, stacklevel=2)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # Lightning calls .train() on the whole LightningModule every epoch.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, *args, **kwargs) -> ModelOutput:
        return super().forward(x, *args, **kwargs)


class TeacherEnsemble(nn.Module):
    """Frozen teachers sharing one canonical batch.

    Teachers whose :class:`InputSpec` is identical share one preprocessed input, so
    three teachers at the same resolution resize and normalise once. Headless teachers
    (``num_classes: 0``, feature teachers) may sit beside classifier teachers; the
    classifier teachers must agree on their class count.

    Args:
        teachers: :class:`Teacher` modules, or :class:`ModelConfig`s to build them from.
    """

    def __init__(self, teachers: Sequence[Teacher | ModelConfig]) -> None:
        super().__init__()
        built = [t if isinstance(t, Teacher) else Teacher.from_config(t) for t in teachers]
        self.teachers = nn.ModuleList(built)
        classes = {t.num_classes for t in built if not t.headless}
        if len(classes) > 1:
            listing = ", ".join(f"{t.name}: {t.num_classes}" for t in built if not t.headless)
            raise ConfigError(
                f"classifier teachers disagree on num_classes ({listing}); all must predict the "
                "same classes (set num_classes: 0 on a teacher used for its features only)"
            )
        # Frozen from the start like its members: Lightning records every module's mode
        # before validation and restores it after, so a container left in train mode here
        # would read "train" in summaries and mode checks.
        super().train(False)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        # Frozen like its members, so summaries and mode checks read "eval".
        return super().train(False)

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self):
        return iter(self.teachers)

    def __getitem__(self, i: int) -> Teacher:
        return self.teachers[i]

    @property
    def num_classes(self) -> int:
        """The classifier teachers' class count; 0 when every teacher is headless."""
        return next((t.num_classes for t in self.teachers if not t.headless), 0)

    @property
    def classifiers(self) -> list[int]:
        """Positions of the teachers with a classifier (not headless)."""
        return [i for i, t in enumerate(self.teachers) if not t.headless]

    @property
    def names(self) -> list[str]:
        """One unique name per teacher for metric keys and summaries: its ``alias`` (default
        the model's short name), with ``_2``, ``_3`` ... on repeats. ``ensemble`` is taken by
        the ensemble's own metrics."""
        names: list[str] = []
        for teacher in self.teachers:
            base = teacher.alias
            name, n = base, 1
            while name in names or name == ENSEMBLE:
                n += 1
                name = f"{base}_{n}"
            names.append(name)
        return names

    @torch.no_grad()
    def forward(
        self,
        x: Tensor,
        stages: Sequence[tuple[int, ...]] | tuple[int, ...] = (),
        pooled: bool = False,
    ) -> list[ModelOutput]:
        """Run every teacher on the canonical batch ``x`` ``(B, 3, H, W)``.

        Args:
            stages: one tuple of stage indices for all teachers, or one tuple per teacher.
            pooled: also return each teacher's ``(B, D)`` pre-logits features.
        """
        per_teacher = per_teacher_stages(stages, len(self.teachers))
        prepared: dict[InputSpec, Tensor] = {}
        outputs = []
        for teacher, s in zip(self.teachers, per_teacher, strict=True):
            spec = teacher.input_spec
            if spec not in prepared:
                prepared[spec] = teacher.preprocess(x)
            outputs.append(teacher(prepared[spec], stages=s, pooled=pooled, preprocessed=True))
        return outputs


def ensemble_probs(
    outputs: Sequence[ModelOutput], temperature: float = 1.0, weights: Tensor | None = None
) -> Tensor:
    """Average of the teachers' ``softmax(z / T)``, ``(B, K)``.

    Args:
        weights: optional per-sample teacher weights ``(B, M)`` that sum to 1 over ``M``;
            uniform when omitted (MEAL V2 / Hinton ensemble target).
    """
    probs = torch.stack([(o.logits.float() / temperature).softmax(-1) for o in outputs], dim=1)
    if weights is None:
        return probs.mean(dim=1)
    return (weights.unsqueeze(-1) * probs).sum(dim=1)


def ensemble_log_probs(
    outputs: Sequence[ModelOutput], temperature: float = 1.0, weights: Tensor | None = None
) -> Tensor:
    """``log`` of :func:`ensemble_probs`, ``(B, K)``, computed in log space (a ``logsumexp``
    over the teachers' ``log_softmax(z / T)``): a confident teacher's non-target
    log-probabilities stay exact where its probabilities would underflow to 0.

    Args:
        weights: optional per-sample teacher weights ``(B, M)`` that sum to 1 over ``M``.
    """
    log_probs = torch.stack(
        [torch.log_softmax(o.logits.float() / temperature, -1) for o in outputs], dim=1
    )
    if weights is None:
        if len(outputs) == 1:
            return log_probs[:, 0]
        return torch.logsumexp(log_probs, dim=1) - math.log(len(outputs))
    return torch.logsumexp(log_probs + weights.float().log().unsqueeze(-1), dim=1)


def one_stage_per_teacher(stage: int | Sequence[int], n: int, owner: str) -> list[int]:
    """A term's ``teacher_stage`` (one index for all ``n`` teachers, or one per teacher) as
    ``n`` ints; ``owner`` names the term in the error for a list of the wrong length."""
    if isinstance(stage, int):
        return [stage] * n
    stages = [int(s) for s in stage]
    if len(stages) != n:
        raise ConfigError(
            f"{owner} teacher_stage lists {len(stages)} stages for {n} teachers; give one "
            "index per teacher or a single index"
        )
    return stages


def per_teacher_stages(stages, n: int) -> list[tuple[int, ...]]:
    """One tuple of stage indices for all ``n`` teachers, or one per teacher -> ``n`` tuples."""
    if not stages:
        return [()] * n
    if all(isinstance(s, int) for s in stages):
        return [tuple(stages)] * n
    if len(stages) != n:
        raise ConfigError(f"got stage lists for {len(stages)} teachers, but there are {n}")
    return [tuple(s) for s in stages]


def teacher_stages_requested(terms: Sequence[Any], n: int) -> list[tuple[int, ...]]:
    """The union of the stage indices ``terms`` read from each of ``n`` teachers, as ``n``
    sorted tuples: every teacher computes only the features somebody reads. Each term reads
    its ``teacher_indices`` (set when it was bound to the teachers)."""
    wanted: list[set[int]] = [set() for _ in range(n)]
    for term in terms:
        own = per_teacher_stages(term.teacher_stages, len(term.teacher_indices))
        for i, stages in zip(term.teacher_indices, own, strict=True):
            wanted[i].update(stages)
    return [tuple(sorted(s)) for s in wanted]


def teacher_fingerprint(teachers: Sequence[Backbone]) -> str:
    """sha256 over the teachers' names, input specs and every weight and buffer: caches
    derived from teachers (class means, soft targets) are keyed on it."""
    h = hashlib.sha256()
    for teacher in teachers:
        h.update(f"{teacher.name}|{teacher.input_spec}".encode())
        if teacher.config.stage_norm:  # other features; off keeps earlier fingerprints
            h.update(b"|stage_norm")
        for key, value in sorted(teacher.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
