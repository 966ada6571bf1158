"""Adaptor heads: agglomerative (RADIO-style) distillation of several teachers' features
into one student, with teacher-feature normalisation and teacher balancing (Ranzinger,
Heinrich, Kautz, Molchanov, "AM-RADIO: Agglomerative Vision Foundation Model", CVPR 2024;
normalisation: PHI-S, arXiv 2410.01680)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..errors import ConfigError
from ..loader_pass import batch_limit, run_over_loader, training_loader
from ..losses.adaptor import adaptive_balance, adaptor_match_loss, ema_update, fixed_balance
from ..losses.multi_teacher import teacher_drop_coefficients
from ..models import Backbone, ModelOutput
from ..normalizers import NORMALIZERS, make_normalizer
from ..teachers import one_stage_per_teacher
from .base import DistillTerm, TermOutput

BALANCES = ("fixed", "drop", "adaptive")


class AdaptorHead(nn.Sequential):
    """``Linear -> LayerNorm -> GELU -> Linear`` on the last axis: ``(..., C_in) -> (..., C_out)``
    (RADIO's adaptor MLP, one hidden layer)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )
        for m in (self[0], self[3]):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def resample_to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *grid)``, bilinear (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    shrinking = x.shape[-2] > grid[0] or x.shape[-1] > grid[1]
    return F.interpolate(
        x, size=tuple(grid), mode="bilinear", align_corners=False, antialias=shrinking
    )


class AdaptorHeads(DistillTerm):
    """Per teacher, two adaptor heads on the student: a summary head from the student's
    summary to the teacher's summary, and a spatial head from the student's stage map to the
    teacher's stage map, token by token on the teacher's own grid.

    - **Summary**: ``ModelOutput.pooled``, i.e. the class token of a ViT (timm's
      ``global_pool='token'``) and the pooled map of a CNN or MLP, for student and teacher.
    - **Spatial**: the student's ``student_stage`` map is resampled (bilinear) to the grid
      of the teacher's ``teacher_stage`` map, then the head maps every position to the
      teacher's width. The student side is resampled, never the teacher's: the teacher's
      tokens are the targets, and interpolating them would invent (blurred) targets and
      change the distribution the normaliser was estimated on. Each teacher keeps its own
      grid, so a ViT at 4x4 and a CNN at 2x2 are matched at their own resolutions.
    - **Loss**, per sample and teacher: ``summary_weight * l(summary) + spatial_weight *
      l(spatial)`` with ``l = cosine_weight * (1 - cos) + smooth_l1_weight * SmoothL1``
      (:func:`~visdistill.losses.adaptor.adaptor_match_loss`; tokens averaged), against the
      teacher's features after the ``normalize`` normaliser (``none``, ``standardize``
      per channel, or ``phi_s``; :mod:`visdistill.normalizers`). The normalisers' statistics
      are estimated when fit starts, by one pass of the teachers (eval, no gradient) over
      ``fit_samples`` random training images, and saved in the checkpoint.
    - **Balance** over teachers: ``fixed`` (``fixed_weights``, normalised to sum to 1;
      equal by default), ``drop`` (UNIC teacher dropping: per image the worst-matched
      teacher is kept and each other one dropped with ``drop_prob``; the kept pairs share
      weight equally), or ``adaptive`` (each teacher's loss divided by its running mean,
      an EMA with ``ema_momentum``, so no teacher dominates by its loss's scale). In
      evaluation every teacher is kept and weighted by ``fixed_weights``, so ``val/loss`` is
      comparable across epochs. Per-sample teacher weights from another term (UNIC, MST)
      multiply each sample's losses by ``M * w[b, t]`` before balancing.

    Reads no labels and no logits: teachers and student may be headless. The returned
    parts are each teacher's share of the loss, logged as ``train/<name>/<teacher>``; the
    diagnostics ``<teacher>_summary_cos`` and ``<teacher>_spatial_cos`` (``last_metrics``,
    logged as ``train/adaptor/...``) are the cosine of each head's output, mapped back to
    the teacher's space by the normaliser's inverse, with the teacher's features: the
    per-teacher feature-match quality.

    Args:
        student_stage: the student stage that feeds the spatial heads.
        teacher_stage: each teacher's stage to match (one index for all, or one per teacher).
        hidden: heads' hidden width (default ``max(student width, teacher width)``).
        summary_weight, spatial_weight: weights of the summary and spatial losses.
        cosine_weight, smooth_l1_weight, beta: the per-feature loss (see above).
        normalize: ``none``, ``standardize`` or ``phi_s`` (teacher targets).
        balance: ``fixed``, ``drop`` or ``adaptive``.
        fixed_weights: per-teacher weights (``balance: fixed``, and in evaluation).
        drop_prob: teacher-dropping probability (``balance: drop``).
        ema_momentum: running-mean momentum (``balance: adaptive``).
        fit_samples: training images for the normalisers' estimation pass (shortened by
            ``fast_dev_run`` / ``limit_train_batches``).
        weight: multiplier of the term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "adaptor"
    needs_pooled = True
    contract_exempt = {
        "zero_case": "the adaptor heads are learnt MLPs: even a teacher that is the student "
        "itself is not reproduced before training (the loss is 0 when a head's output equals "
        "the normalised target: tests/test_adaptor.py)"
    }

    def __init__(
        self,
        student_stage: int = -1,
        teacher_stage: int | Sequence[int] = -1,
        hidden: int | None = None,
        summary_weight: float = 1.0,
        spatial_weight: float = 1.0,
        cosine_weight: float = 1.0,
        smooth_l1_weight: float = 1.0,
        beta: float = 1.0,
        normalize: str = "phi_s",
        balance: str = "fixed",
        fixed_weights: Sequence[float] | None = None,
        drop_prob: float = 0.5,
        ema_momentum: float = 0.99,
        fit_samples: int = 4096,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if normalize not in NORMALIZERS:
            raise ConfigError(
                f"AdaptorHeads normalize must be one of {', '.join(NORMALIZERS)}, got {normalize!r}"
            )
        if balance not in BALANCES:
            raise ConfigError(
                f"AdaptorHeads balance must be one of {', '.join(BALANCES)}, got {balance!r}"
            )
        if not 0 <= drop_prob < 1:
            raise ConfigError(f"AdaptorHeads drop_prob must be in [0, 1), got {drop_prob}")
        if not 0 <= ema_momentum < 1:
            raise ConfigError(f"AdaptorHeads ema_momentum must be in [0, 1), got {ema_momentum}")
        weights = (summary_weight, spatial_weight, cosine_weight, smooth_l1_weight)
        if min(weights) < 0 or summary_weight + spatial_weight == 0:
            raise ConfigError(
                "AdaptorHeads summary/spatial/cosine/smooth_l1 weights must be >= 0, and "
                f"summary_weight + spatial_weight > 0; got {weights}"
            )
        if cosine_weight + smooth_l1_weight == 0:
            raise ConfigError("AdaptorHeads needs cosine_weight or smooth_l1_weight > 0")
        if int(fit_samples) < 2:
            raise ConfigError(f"AdaptorHeads fit_samples must be >= 2, got {fit_samples}")
        self.student_stage, self.teacher_stage = int(student_stage), teacher_stage
        self.hidden = hidden
        self.summary_weight, self.spatial_weight = float(summary_weight), float(spatial_weight)
        self.cosine_weight, self.smooth_l1_weight = float(cosine_weight), float(smooth_l1_weight)
        self.beta, self.normalize, self.balance = float(beta), normalize, balance
        self.fixed_weights = None if fixed_weights is None else [float(w) for w in fixed_weights]
        if self.fixed_weights is not None and (
            min(self.fixed_weights) < 0 or sum(self.fixed_weights) <= 0
        ):
            raise ConfigError(
                f"AdaptorHeads fixed_weights must be >= 0 with a positive sum, got {fixed_weights}"
            )
        self.drop_prob, self.ema_momentum = float(drop_prob), float(ema_momentum)
        self.fit_samples = int(fit_samples)
        self.student_stages = (self.student_stage,)
        self.teacher_names: list[str] = []

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        student.check_stages(self.student_stages)
        n = len(teachers)
        stages = one_stage_per_teacher(self.teacher_stage, n, "AdaptorHeads")
        if self.fixed_weights is not None and len(self.fixed_weights) != n:
            raise ConfigError(
                f"AdaptorHeads fixed_weights lists {len(self.fixed_weights)} weights for {n} "
                "teachers; give one per teacher the term reads"
            )
        self.per_teacher_stage = stages
        self.teacher_stages = tuple((s,) for s in stages)
        d_s = student.num_features
        c_s = student.feature_info[self.student_stage]["num_chs"]
        self.summary_heads, self.spatial_heads = nn.ModuleList(), nn.ModuleList()
        self.summary_norms, self.spatial_norms = nn.ModuleList(), nn.ModuleList()
        self.teacher_names = []
        for teacher, s in zip(teachers, stages, strict=True):
            teacher.check_stages((s,))
            d_t, c_t = teacher.num_features, teacher.feature_info[s]["num_chs"]
            self.summary_heads.append(AdaptorHead(d_s, self.hidden or max(d_s, d_t), d_t))
            self.spatial_heads.append(AdaptorHead(c_s, self.hidden or max(c_s, c_t), c_t))
            self.summary_norms.append(make_normalizer(self.normalize, d_t))
            self.spatial_norms.append(make_normalizer(self.normalize, c_t))
            name, k = teacher.alias, 1
            while name in self.teacher_names:
                k += 1
                name = f"{teacher.alias}_{k}"
            self.teacher_names.append(name)
        weights = self.fixed_weights or [1.0] * n
        self.register_buffer("balance_weights", torch.tensor(weights), persistent=False)
        self.register_buffer("loss_ema", torch.ones(n))
        self.register_buffer("loss_ema_ready", torch.zeros(n, dtype=torch.bool))

    # ------------------------------------------------------------------ normalisers
    @property
    def normalizers_fitted(self) -> bool:
        """Whether every teacher's normalisers have their statistics."""
        return all(n.is_fitted for n in [*self.summary_norms, *self.spatial_norms])

    def reset_normalizers(self) -> None:
        """Start a new estimation pass (forget accumulated sums)."""
        for norm in [*self.summary_norms, *self.spatial_norms]:
            norm.reset()

    @torch.no_grad()
    def accumulate_normalizers(self, teachers: Sequence[ModelOutput]) -> None:
        """Add one batch of this term's teacher outputs (pooled features and the matched
        stages) to the normalisers' running moments."""
        if len(teachers) != len(self.summary_norms):
            raise ConfigError(
                f"AdaptorHeads reads {len(self.summary_norms)} teachers, got {len(teachers)}"
            )
        for m, (out, s) in enumerate(zip(teachers, self.per_teacher_stage, strict=True)):
            self.summary_norms[m].accumulate(out.pooled.float())
            self.spatial_norms[m].accumulate(out.stages[s].float())

    def finalize_normalizers(self) -> None:
        """Turn the accumulated moments into the normalisers' statistics (merged across
        ranks under a distributed strategy)."""
        for norm in [*self.summary_norms, *self.spatial_norms]:
            norm.finalize()

    @torch.no_grad()
    def fit_normalizers(
        self,
        teachers: Sequence[Backbone],
        batches: Iterable[dict[str, Tensor]],
        device: Any = None,
        progress: bool = False,
    ) -> None:
        """Estimate the normalisers from ``batches`` (dicts with ``"image"`` ``(B, 3, H, W)``
        in ``[0, 1]``) run through ``teachers`` (this term's, in its order; frozen teachers
        stay in eval mode, outputs without gradient). Under a distributed strategy every
        rank passes its own share; the statistics are merged across ranks."""
        if len(teachers) != len(self.summary_norms):
            raise ConfigError(
                f"AdaptorHeads reads {len(self.summary_norms)} teachers, got {len(teachers)}"
            )
        self.reset_normalizers()
        stages = self.per_teacher_stage

        def forward(models: nn.ModuleList, batch: dict[str, Tensor]) -> list[ModelOutput]:
            return [
                t(batch["image"], stages=(s,), pooled=True)
                for t, s in zip(models, stages, strict=True)
            ]

        passes = run_over_loader(
            nn.ModuleList(teachers),
            batches,
            forward,
            device=device,
            desc="AdaptorHeads normaliser statistics",
            progress=progress,
            leave=False,
        )
        for _, outs in passes:
            self.accumulate_normalizers(outs)
        self.finalize_normalizers()

    def on_fit_start(self, module: Any) -> None:
        if self.normalizers_fitted:
            return  # nothing to estimate, or restored from a checkpoint
        trainer = module.trainer
        loader = training_loader(trainer, "AdaptorHeads' normaliser statistics")
        dataset = loader.dataset
        batch_size = loader.batch_size or 64
        n = min(self.fit_samples, len(dataset))
        limit = batch_limit(trainer.limit_train_batches, len(loader))
        if limit is not None:  # fast_dev_run / limit_train_batches shorten this pass too
            n = min(n, max(2, limit * batch_size))
        # Random images, not the first ones: an image folder is sorted by class.
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
        shard = order[trainer.global_rank :: trainer.world_size].tolist()
        sub = DataLoader(
            Subset(dataset, shard),
            batch_size=batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
        )
        self.fit_normalizers(
            self.own(list(module.teachers)), sub, module.device, progress=trainer.is_global_zero
        )
        if n < self.fit_samples and limit is None and trainer.is_global_zero:
            warnings.warn(
                f"AdaptorHeads estimated its {self.normalize} statistics from all {n} training "
                f"images (fit_samples {self.fit_samples})",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ loss
    def per_teacher_losses(
        self, student: ModelOutput, teachers: Sequence[ModelOutput]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B, M)`` per-sample losses against each teacher, and the per-teacher cosines of
        the heads' outputs (mapped back to teacher space) with the teachers' features."""
        if not self.normalizers_fitted:
            raise ConfigError(
                f"AdaptorHeads' {self.normalize} normalisers have no statistics: they are "
                "estimated when fit starts; outside a fit call fit_normalizers(teachers, "
                "batches) first, or use normalize: none"
            )
        if student.pooled is None or self.student_stage not in student.stages:
            raise ConfigError(
                "AdaptorHeads reads the student's pooled features and stage "
                f"{self.student_stage}; run the student with pooled=True and those stages "
                "(the DistillationModule does)"
            )
        s_summary = student.pooled
        s_map = student.stages[self.student_stage]
        losses, cosines = [], {}
        for m, (out, s) in enumerate(zip(teachers, self.per_teacher_stage, strict=True)):
            t_map = out.stages[s].float()  # (B, C_t, h, w)
            pred_summary = self.summary_heads[m](s_summary)  # (B, D_t)
            tokens = rearrange(resample_to_grid(s_map, t_map.shape[-2:]), "b c h w -> b (h w) c")
            pred_spatial = self.spatial_heads[m](tokens)  # (B, h*w, C_t)
            t_tokens = rearrange(t_map, "b c h w -> b (h w) c")
            y_summary = self.summary_norms[m](out.pooled.float())
            y_spatial = self.spatial_norms[m](t_tokens)
            kw = dict(
                cosine_weight=self.cosine_weight,
                smooth_l1_weight=self.smooth_l1_weight,
                beta=self.beta,
            )
            losses.append(
                self.summary_weight * adaptor_match_loss(pred_summary, y_summary, **kw)
                + self.spatial_weight * adaptor_match_loss(pred_spatial, y_spatial, **kw)
            )
            with torch.no_grad():
                name = self.teacher_names[m]
                back = self.summary_norms[m].inverse(pred_summary.detach().float())
                cosines[f"{name}_summary_cos"] = F.cosine_similarity(
                    back, out.pooled.float(), dim=-1
                ).mean()
                back = self.spatial_norms[m].inverse(pred_spatial.detach().float())
                cosines[f"{name}_spatial_cos"] = F.cosine_similarity(back, t_tokens, dim=-1).mean()
        return torch.stack(losses, 1), cosines

    def balanced(self, losses: Tensor) -> Tensor:
        """``(M,)`` each teacher's share of the loss under ``balance`` (sums to the loss);
        updates the running means of ``adaptive`` in training."""
        weights = self.balance_weights
        if not self.training or self.balance == "fixed":
            return fixed_balance(losses, weights)
        if self.balance == "drop":
            coeff = teacher_drop_coefficients(losses, self.drop_prob, "global")
            return (coeff * losses).sum(0)
        batch_mean = losses.detach().mean(0).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_mean)  # every rank keeps the same running means
            batch_mean /= dist.get_world_size()
        self.loss_ema.copy_(
            ema_update(self.loss_ema, batch_mean, self.ema_momentum, self.loss_ema_ready)
        )
        self.loss_ema_ready.fill_(True)
        return adaptive_balance(losses, self.loss_ema)

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> TermOutput:
        losses, cosines = self.per_teacher_losses(student, teachers)
        if teacher_weights is not None:  # another term's per-sample weights (rows sum to 1)
            losses = losses * teacher_weights.to(losses) * losses.shape[1]
        shares = self.balanced(losses)
        parts = {name: shares[m] for m, name in enumerate(self.teacher_names)}
        return TermOutput(parts, metrics=cosines)
