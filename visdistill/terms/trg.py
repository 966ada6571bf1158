"""TRG term: token-level relationship graph distillation (Zhang, Liu, He, arXiv 2306.12442)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.multi_teacher import teacher_weighted_mean
from ..losses.trg import (
    cosine_temperature,
    feature_map_tokens,
    trg_contextual_loss,
    trg_global_loss,
    trg_local_loss,
)
from ..models import Backbone, ModelOutput
from ..teachers import one_stage_per_teacher
from .base import DistillTerm, uniform_or


class TRG(DistillTerm):
    """Token-graph distillation from each teacher's stage map to one student stage.

    Tokens: each stage map is resampled to a ``grid x grid`` token grid
    (:func:`~visdistill.losses.trg.feature_map_tokens`), so CNN maps and ViT/Mixer token
    grids of any size correspond position by position. Per step, ``tokens_per_image``
    positions are sampled per image (shared by student and teachers); the union over the
    batch is the graph's node set. Losses (see :mod:`visdistill.losses.trg`, which lists
    the choices that are ours where the paper's spec is unverified):

    - ``context``: per-image token-similarity matrices (all ``grid^2`` tokens), MSE;
    - ``local``: kNN neighbourhood distributions, KL(teacher || student);
    - ``global``: cross-space contrastive loss through a linear projector per teacher,
      temperature decaying from ``tau_start`` to ``tau_end`` over the fit (cosine).

    Zero case: ``context`` and ``local`` are 0 when every teacher's map is the student's
    (``global`` is not: it is contrastive, through a projector).

    Combine with a ``KD`` term for the paper's logit part. Per-sample teacher weights
    average the per-teacher losses (uniform by default).

    Args:
        student_stage: student stage index (e.g. ``-1``, or an earlier one whose map is at
            least ``grid`` wide).
        teacher_stage: one index for all teachers, or one per teacher.
        grid: token grid side.
        tokens_per_image: sampled nodes per image (clipped to ``grid^2``).
        k: neighbours in the local graph.
        tau_start, tau_end: global-loss temperature schedule.
        hard_global: the paper's one-hot InfoNCE instead of our soft target.
        context_weight, local_weight, global_weight: weights of the three losses.
        weight: multiplier of the whole term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "trg"
    zero_parts = ("context", "local")

    def __init__(
        self,
        student_stage: int = -1,
        teacher_stage: int | Sequence[int] = -1,
        grid: int = 4,
        tokens_per_image: int = 8,
        k: int = 8,
        tau_start: float = 1.0,
        tau_end: float = 0.07,
        hard_global: bool = False,
        context_weight: float = 1.0,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if grid < 2:
            raise ConfigError(f"TRG grid must be >= 2 (a token graph needs tokens), got {grid}")
        if not 0 < tau_end <= tau_start:
            raise ConfigError(f"TRG needs 0 < tau_end <= tau_start, got {tau_end}, {tau_start}")
        self.student_stage = int(student_stage)
        self.teacher_stage = teacher_stage
        self.grid, self.tokens_per_image, self.k = int(grid), int(tokens_per_image), int(k)
        self.tau_start, self.tau_end, self.hard_global = tau_start, tau_end, hard_global
        self.context_weight, self.local_weight = float(context_weight), float(local_weight)
        self.global_weight = float(global_weight)
        self.student_stages = (self.student_stage,)
        self.projectors = nn.ModuleList()

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        student.check_stages(self.student_stages)
        per_teacher = one_stage_per_teacher(self.teacher_stage, len(teachers), "TRG")
        self.per_teacher_stage = per_teacher
        self.teacher_stages = tuple((s,) for s in per_teacher)
        c_s = student.feature_info[self.student_stage]["num_chs"]
        for teacher, s in zip(teachers, per_teacher, strict=True):
            teacher.check_stages((s,))
            self.projectors.append(nn.Linear(c_s, teacher.feature_info[s]["num_chs"]))

    @property
    def temperature(self) -> float:
        """Current global-loss temperature (follows ``progress``)."""
        return cosine_temperature(self.progress, self.tau_start, self.tau_end)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        b = len(target)
        s_map = student.stages[self.student_stage]
        weights = uniform_or(teacher_weights, b, len(teachers), s_map)
        s_tok = feature_map_tokens(s_map, self.grid)  # (B, L, C)
        n_tok = s_tok.shape[1]
        m = min(self.tokens_per_image, n_tok)
        # Same positions for the student and every teacher, so nodes correspond.
        pos = torch.rand(b, n_tok, device=s_tok.device).argsort(1)[:, :m]
        s_nodes = _gather(s_tok, pos)
        tau = self.temperature
        context, local, global_ = [], [], []
        for out, proj, s in zip(teachers, self.projectors, self.per_teacher_stage, strict=True):
            t_tok = feature_map_tokens(out.stages[s], self.grid).to(s_tok.dtype)
            t_nodes = _gather(t_tok, pos)
            context.append(trg_contextual_loss(s_tok, t_tok, reduction="none"))
            local.append(trg_local_loss(s_nodes, t_nodes, self.k, "none").view(b, m).mean(1))
            g = trg_global_loss(proj(s_nodes), t_nodes, tau, self.hard_global, "none")
            global_.append(g.view(b, m).mean(1))

        return {
            "context": self.context_weight * teacher_weighted_mean(context, weights),
            "local": self.local_weight * teacher_weighted_mean(local, weights),
            "global": self.global_weight * teacher_weighted_mean(global_, weights),
        }


def _gather(tokens: Tensor, pos: Tensor) -> Tensor:
    """``(B, L, C)`` tokens at positions ``(B, m)`` -> ``(B*m, C)`` nodes."""
    idx = pos.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return tokens.gather(1, idx).reshape(-1, tokens.shape[-1])
