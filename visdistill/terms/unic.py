"""UNIC: one student learns every teacher's features through a ladder of projectors, with
teacher dropping (Sariyildiz, Weinzaepfel, Lucas, Larlus, Kalantidis, "UNIC: Universal
Classification Models via Multi-teacher Distillation", ECCV 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.multi_teacher import feature_match_loss, teacher_drop_coefficients
from ..models import Backbone, ModelOutput
from .base import DistillTerm, TermOutput


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


class RunningStandardizer(nn.Module):
    """Per-channel running mean/std of teacher features (UNIC §2.4).

    ``forward(y, alpha)`` standardises ``y`` ``(..., D)`` with the *current* statistics, then
    (in training) moves them toward the batch's: ``mu <- (1 - alpha) mu + alpha m``. Batch
    statistics are summed over every leading axis and, under DDP, all-reduced (sums, sums of
    squares and counts), so every rank keeps identical buffers.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def batch_stats(self, y: Tensor) -> tuple[Tensor, Tensor]:
        flat = y.detach().reshape(-1, y.shape[-1]).double()
        stats = torch.cat([flat.sum(0), flat.pow(2).sum(0), flat.new_tensor([len(flat)])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        d = y.shape[-1]
        total, sq, n = stats[:d], stats[d : 2 * d], stats[-1]
        mean = total / n
        var = (sq - n * mean.pow(2)) / (n - 1).clamp_min(1)  # unbiased, as the reference
        return mean.float(), var.clamp_min(0).sqrt().float() + 1e-6

    def forward(self, y: Tensor, alpha: float, update: bool) -> Tensor:
        out = (y.float() - self.mean) / (self.std + 1e-6)
        if update:
            mean, std = self.batch_stats(y)
            self.mean.mul_(1 - alpha).add_(alpha * mean)
            self.std.mul_(1 - alpha).add_(alpha * std)
        return out


def ema_weight(progress: float, start: float = 1.0, end: float = 0.001) -> float:
    """UNIC's weight on the new batch's statistics: cosine from ``start`` to ``end``."""
    p = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * p))


class UNIC(DistillTerm):
    """UNIC as a term: the student predicts every teacher's standardised pooled feature
    ("cls") and last-stage spatial tokens ("patch") through ladders of projectors.

    For each teacher and token type, each selected student stage has its own 2-layer MLP
    and the predictions are summed over stages, so intermediate stages get a direct
    signal. Works across widths, families and resolutions: the "cls" prediction reads a
    ViT student's class token at each stage (other students: the average-pooled stage
    map), and the "patch" prediction the stage map resampled to the teacher's last-stage
    grid (ViT tokens are already grids here).

    Per sample and teacher, ``L = 0.5 (l_cls + l_patch)`` with
    ``l = 0.5 (1 - cos) + 0.5 SmoothL1`` against the teacher's features standardised by
    running statistics (momentum annealed from 1 to 0.001 over the fit, cosine). Teacher
    dropping keeps each sample's worst-matched teacher and drops each other teacher with
    probability ``drop_prob`` (in training only: in evaluation every teacher is kept). The
    term provides per-sample teacher weights (the kept
    teachers of each sample, normalised), so a ``KD`` term in the same config follows
    the same dropping.

    Args:
        student_stages: student stages feeding the ladder (default: the last three).
        drop_prob: teacher-dropping probability (official 0.5; 0 disables).
        normalize: ``"global"`` (official) or ``"per_image"`` normalisation of the kept pairs.
        hidden: projector hidden width (default ``max(stage width, teacher width)``).
        student_cls: what a student stage offers the "cls" ladder: ``"auto"`` (the stage's
            class token when the student has one, as the paper's ViT students do; else the
            average-pooled map) or ``"pool"`` (always the pooled map).
        weight: multiplier of the term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "unic"
    needs_pooled = True
    provides_teacher_weights = True
    contract_exempt = {
        "zero_case": "the student predicts standardised teacher features through its own "
        "projector ladders: a student equal to its teachers does not make the loss 0 until "
        "the projectors have learnt to map it"
    }

    def __init__(
        self,
        student_stages: Sequence[int] | None = None,
        drop_prob: float = 0.5,
        normalize: str = "global",
        hidden: int | None = None,
        student_cls: str = "auto",
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if student_cls not in ("auto", "pool"):
            raise ConfigError(f"UNIC student_cls must be 'auto' or 'pool', got {student_cls!r}")
        self.student_cls = student_cls
        if not 0 <= drop_prob < 1:
            raise ConfigError(f"UNIC drop_prob must be in [0, 1), got {drop_prob}")
        if normalize not in ("global", "per_image"):
            raise ConfigError(f"UNIC normalize must be 'global' or 'per_image', got {normalize!r}")
        self.requested_stages = tuple(student_stages) if student_stages is not None else None
        self.drop_prob, self.normalize, self.hidden = float(drop_prob), normalize, hidden
        self.teacher_stages = (-1,)

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        n = len(student.feature_info)
        stages = self.requested_stages or tuple(range(max(n - 3, 0), n))
        student.check_stages(stages)
        self.student_stages = tuple(sorted({s % n for s in stages}))
        has_cls = getattr(getattr(student, "model", None), "cls_token", None) is not None
        self.needs_prefix_tokens = self.student_cls == "auto" and has_cls
        self.cls_ladders, self.patch_ladders = nn.ModuleList(), nn.ModuleList()
        self.cls_stats, self.patch_stats = nn.ModuleList(), nn.ModuleList()
        for teacher in teachers:
            d_cls, d_patch = teacher.num_features, teacher.feature_info[-1]["num_chs"]
            cls, patch = nn.ModuleList(), nn.ModuleList()
            for s in self.student_stages:
                c = student.feature_info[s]["num_chs"]
                cls.append(_mlp(c, self.hidden or max(c, d_cls), d_cls))
                patch.append(_mlp(c, self.hidden or max(c, d_patch), d_patch))
            self.cls_ladders.append(cls)
            self.patch_ladders.append(patch)
            self.cls_stats.append(RunningStandardizer(d_cls))
            self.patch_stats.append(RunningStandardizer(d_patch))

    def _student_cls(self, student: ModelOutput, stage: int) -> Tensor:
        """``(B, C)``: the stage's class token (first prefix token), or its pooled map."""
        if self.needs_prefix_tokens:
            if stage not in student.prefix_tokens:
                raise ConfigError(
                    f"UNIC reads the ViT student's class token at stage {stage}, but the "
                    "student output has none: run the student with prefix_tokens=True (the "
                    "module does), or set student_cls='pool'"
                )
            return student.prefix_tokens[stage][:, 0]
        return student.stages[stage].mean(dim=(2, 3))

    def per_teacher_losses(self, student: ModelOutput, teachers: Sequence[ModelOutput]) -> Tensor:
        """``(B, M)``: each sample's loss against each teacher (updates running stats in
        training)."""
        alpha, update = ema_weight(self.progress), self.training
        losses = []
        for m, out in enumerate(teachers):
            t_map = out.stages[-1]  # (B, C_t, h, w)
            grid = t_map.shape[-2:]
            pred_cls = sum(
                mlp(self._student_cls(student, s))
                for mlp, s in zip(self.cls_ladders[m], self.student_stages, strict=True)
            )
            pred_patch = sum(
                mlp(rearrange(_resample(student.stages[s], grid), "b c h w -> b (h w) c"))
                for mlp, s in zip(self.patch_ladders[m], self.student_stages, strict=True)
            )
            y_cls = self.cls_stats[m](out.pooled, alpha, update)
            t_tokens = rearrange(t_map, "b c h w -> b (h w) c")
            y_patch = self.patch_stats[m](t_tokens, alpha, update)
            losses.append(
                0.5
                * (feature_match_loss(pred_cls, y_cls) + feature_match_loss(pred_patch, y_patch))
            )
        return torch.stack(losses, 1)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> TermOutput:
        losses = self.per_teacher_losses(student, teachers)
        # Dropping regularises training; in evaluation every teacher counts, so the loss of
        # a validation batch (val/loss without accuracy) does not depend on random draws.
        p = self.drop_prob if self.training else 0.0
        coeff = teacher_drop_coefficients(losses, p, self.normalize)
        keep = (coeff > 0).float()
        return TermOutput(
            {"unic": (coeff * losses).sum()}, teacher_weights=keep / keep.sum(-1, keepdim=True)
        )


def _resample(x: Tensor, grid: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)
