"""DisWOT's similarity metrics as a distillation term ("DisWOT as distiller", Dong, Li,
Wei, CVPR 2023, arXiv 2303.15678)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.diswot import ickd_distance, similarity_preserving_distance
from ..models import Backbone, ModelOutput
from ..teachers import one_stage_per_teacher
from .base import DistillTerm, uniform_or


class DisWOT(DistillTerm):
    """The two DisWOT distances between one student stage and one stage of each teacher.

    - ``semantic``: inter-channel correlation distance (ICKD form,
      :func:`~visdistill.losses.diswot.ickd_distance`) between the student's ``(C, C)``
      channel correlations over positions and the teacher's, per image. The search metric
      applies the same distance to classifier-weight gradients; during training the stage
      maps carry that channel semantics. Correlations are ``(C, C)`` whatever the spatial
      size, so only the channel count must agree: a student of another width gets a 1x1
      conv + BatchNorm projector to the teacher's channels (ICKD's embedding).
    - ``relation``: similarity-preserving distance between the ``(B, B)`` batch Gram
      matrices (:func:`~visdistill.losses.diswot.similarity_preserving_distance`), which
      needs no projector.

    With several teachers the per-teacher distances are averaged, weighted by the batch mean
    of the per-sample teacher weights when a term provides them. Teacher features come
    without gradients: only the student (and the projectors) learn. Zero case: both parts
    are 0 when every teacher's stage map is the student's (same width: no projector).

    Args:
        student_stage: the student stage (default the last, before pooling).
        teacher_stage: one stage for all teachers, or one per teacher.
        semantic_weight, relation_weight: multipliers of the two parts (0 turns one off).
        weight: multiplier of the whole term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "diswot"
    zero_parts = ("semantic", "relation")

    def __init__(
        self,
        student_stage: int = -1,
        teacher_stage: int | Sequence[int] = -1,
        semantic_weight: float = 1.0,
        relation_weight: float = 1.0,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if semantic_weight < 0 or relation_weight < 0 or semantic_weight + relation_weight == 0:
            raise ConfigError(
                "DisWOT needs non-negative semantic_weight and relation_weight, not both 0; got "
                f"{semantic_weight} and {relation_weight}"
            )
        self.semantic_weight, self.relation_weight = float(semantic_weight), float(relation_weight)
        self.student_stage = int(student_stage)
        self._teacher_stage = teacher_stage
        self.student_stages = (self.student_stage,)
        self.projectors = nn.ModuleList()

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        stages = one_stage_per_teacher(self._teacher_stage, len(teachers), "DisWOT")
        student.check_stages([self.student_stage])
        c_s = student.feature_info[self.student_stage]["num_chs"]
        self.teacher_stages = [(s,) for s in stages]
        self.teacher_stage_list = stages
        self.projectors = nn.ModuleList()
        for teacher, s in zip(teachers, stages, strict=True):
            teacher.check_stages([s])
            c_t = teacher.feature_info[s]["num_chs"]
            if c_t == c_s or self.semantic_weight == 0:
                self.projectors.append(nn.Identity())
            else:
                self.projectors.append(
                    nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
                )

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        feat_s = student.stages[self.student_stage]
        weights = uniform_or(teacher_weights, feat_s.shape[0], len(teachers), feat_s).mean(0)
        semantic = relation = feat_s.new_zeros((), dtype=torch.float32)
        for i, (out, stage) in enumerate(zip(teachers, self.teacher_stage_list, strict=True)):
            feat_t = out.stages[stage].detach()
            if self.semantic_weight:
                semantic = semantic + weights[i] * ickd_distance(self.projectors[i](feat_s), feat_t)
            if self.relation_weight:
                relation = relation + weights[i] * similarity_preserving_distance(feat_s, feat_t)
        losses = {}
        if self.semantic_weight:
            losses["semantic"] = self.semantic_weight * semantic
        if self.relation_weight:
            losses["relation"] = self.relation_weight * relation
        return losses
