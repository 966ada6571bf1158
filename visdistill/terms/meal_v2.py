"""MEAL V2: the teachers' averaged soft target plus an output discriminator (Shen &
Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without
Tricks", 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.kd import soft_cross_entropy
from ..losses.multi_teacher import discriminator_loss
from ..models import Backbone, ModelOutput
from ..teachers import ensemble_probs
from .base import DistillTerm, TermOutput, uniform_or

MODES = ("joint", "grl", "none")
DISC_INPUTS = ("logit_mean", "prob")


class OutputDiscriminator(nn.Sequential):
    """Three linear layers ``C -> C//K -> C//K^2 -> 2`` with ReLU after each, the last one
    included when ``final_relu`` (the official code's oddity, kept for fidelity).

    ``K = reduction`` is 8 in the official code. Hidden widths are at least ``min_hidden``
    (our guard: ``C // 64`` is 0 for fewer than 64 classes). ``C = 1000``, ``K = 8`` gives
    the official 127,047 parameters.
    """

    def __init__(
        self,
        num_classes: int,
        final_relu: bool = True,
        min_hidden: int = 4,
        reduction: int = 8,
    ) -> None:
        if reduction < 1:
            raise ConfigError(f"discriminator width reduction must be >= 1, got {reduction}")
        widths = [
            num_classes,
            max(num_classes // reduction, min_hidden),
            max(num_classes // reduction**2, min_hidden),
        ]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 2))
        if final_relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)
        self.widths = [*widths, 2]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def gradient_reversal(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity forward, ``-scale * grad`` backward."""
    return _GradientReversal.apply(x, scale)


class MEALV2(DistillTerm):
    """MEAL V2 as a term: soft cross-entropy against the mean of the teachers' softmax
    (T = 1, per-sample teacher weights when another term provides them) plus the output
    discriminator.

    Modes:

    - ``"joint"`` (official): the discriminator's BCE is *minimised* by the student and the
      discriminator together, with the one optimizer; in effect a regulariser.
    - ``"grl"``: true adversarial training: the discriminator minimises its BCE while a
      gradient-reversal layer makes the student maximise it (fool the discriminator).
    - ``"none"``: the ensemble soft target only.

    No zero case: a student equal to its teachers still has the soft target's entropy as
    its soft cross-entropy, and the discriminator's BCE at chance.

    MEAL V2 trains without hard labels from a *pretrained* student: set the student's
    ``pretrained``/``checkpoint`` and ``ce_weight: 0``. From scratch, keep the CE.

    Args:
        mode: ``"joint"``, ``"grl"`` or ``"none"``.
        disc_input: ``"logit_mean"`` (official: student logits vs mean teacher logits) or
            ``"prob"`` (the FKD variant: softmax vs the soft target).
        final_relu: ReLU after the discriminator's last layer (official).
        disc_weight: weight of the discriminator loss relative to the soft CE (official 1).
        disc_lr_scale: the discriminator's learning rate as a multiple of the optimizer's
            (its own param group, kept by schedulers). Official code: intended 1e-4 against
            the student's 0.01, but overwritten each epoch (its issue #9), so 1 reproduces
            it; a re-implementer found ``grl`` diverges with cosine schedules unless it is
            low.
        disc_min_hidden: smallest hidden width of the discriminator (our guard for small
            ``C``; the official rule gives 0 below 64 classes).
        disc_reduction: ``K`` of the discriminator's widths ``C -> C//K -> C//K^2 -> 2``
            (official 8).
        weight: multiplier of the whole term.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "meal_v2"
    needs_logits = True
    contract_exempt = {
        "zero_case": "the soft cross-entropy of a student equal to its teachers is the "
        "teachers' entropy, not 0 (the official loss), and the discriminator's BCE is not 0 "
        "when it cannot tell them apart"
    }

    def __init__(
        self,
        mode: str = "joint",
        disc_input: str = "logit_mean",
        final_relu: bool = True,
        disc_weight: float = 1.0,
        disc_min_hidden: int = 4,
        disc_lr_scale: float = 1.0,
        disc_reduction: int = 8,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()
        if disc_reduction < 1:
            raise ConfigError(f"MEALV2 disc_reduction must be >= 1, got {disc_reduction}")
        self.disc_reduction = int(disc_reduction)
        if disc_lr_scale <= 0:
            raise ConfigError(f"MEALV2 disc_lr_scale must be > 0, got {disc_lr_scale}")
        self.disc_lr_scale = float(disc_lr_scale)
        if mode not in MODES:
            raise ConfigError(f"MEALV2 mode must be one of {MODES}, got {mode!r}")
        if disc_input not in DISC_INPUTS:
            raise ConfigError(f"MEALV2 disc_input must be one of {DISC_INPUTS}, got {disc_input!r}")
        self.mode, self.disc_input, self.final_relu = mode, disc_input, final_relu
        # The mean teacher *logits*: a teacher cache holds log-probabilities only.
        self.needs_teacher_logits = mode != "none" and disc_input == "logit_mean"
        if disc_min_hidden < 1:
            raise ConfigError(f"MEALV2 disc_min_hidden must be >= 1, got {disc_min_hidden}")
        self.disc_weight, self.disc_min_hidden = float(disc_weight), int(disc_min_hidden)
        self.discriminator: OutputDiscriminator | None = None

    def lr_scales(self) -> list[tuple[list[nn.Parameter], float]]:
        if self.discriminator is None or self.disc_lr_scale == 1.0:
            return []
        return [(list(self.discriminator.parameters()), self.disc_lr_scale)]

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        if self.mode != "none":
            self.discriminator = OutputDiscriminator(
                student.num_classes, self.final_relu, self.disc_min_hidden, self.disc_reduction
            )

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> TermOutput:
        probs = ensemble_probs(teachers, 1.0, teacher_weights)
        out = {"soft_ce": soft_cross_entropy(student.logits, probs)}
        if self.discriminator is None:
            return TermOutput(out)
        s = student.logits.float()
        if self.disc_input == "prob":
            s, t = s.softmax(-1), probs
        else:  # the (per-sample weighted) mean of the teachers' logits
            logits = torch.stack([o.logits.float() for o in teachers], 1)  # (B, M, K)
            w = uniform_or(teacher_weights, len(s), len(teachers), s)
            t = (w.unsqueeze(-1) * logits).sum(1)
        if self.mode == "grl":
            s = gradient_reversal(s)
        scores = self.discriminator(torch.cat([s, t.detach()]))
        is_teacher = torch.arange(2 * len(s), device=s.device) >= len(s)
        out["disc"] = self.disc_weight * discriminator_loss(scores, is_teacher)
        with torch.no_grad():  # 0.5 = the discriminator cannot tell student from teachers
            disc_acc = (scores.argmax(-1) == is_teacher).float().mean()
        return TermOutput(out, metrics={"disc_acc": disc_acc})
