"""A distillation term of your own, in one file: a FitNets-style hint on pooled features.

The student's pooled (pre-logits) features ``(B, D_s)`` are mapped to each teacher's width
``D_t`` by a linear regressor (identity when the widths agree) and pulled toward the
teacher's pooled features ``(B, D_t)`` by a mean squared error, averaged over the teachers
with the per-sample teacher weights (after Romero et al., "FitNets: Hints for Thin Deep
Nets", ICLR 2015, which hints an intermediate map instead).

Use it from Python::

    from custom_term import PooledHint
    module = DistillationModule(student, teachers, terms=[PooledHint(weight=0.5), KD()])

or from a config, once the file is importable (on ``PYTHONPATH``) and imported, e.g. with
``visdistill fit -c config.yaml`` where the config lists::

    model:
      init_args:
        terms:
          - class_path: custom_term.PooledHint
            init_args: {weight: 0.5}

``tests/test_term_contract.py`` runs the term contract on this class too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visdistill.errors import ConfigError
from visdistill.losses import teacher_weighted_mean
from visdistill.models import Backbone, ModelOutput
from visdistill.terms.base import DistillTerm


class PooledHint(DistillTerm):
    """MSE between the student's regressed pooled features and each teacher's.

    Zero case: 0 when every teacher is the student itself (same width, so no regressor).

    Args:
        normalize: compare L2-normalised features (scale-free) instead of raw ones.
        weight: multiplier of the term in the total loss.
        teachers: the teachers this term reads, by name or position (default: all).
    """

    name = "hint"
    needs_pooled = True  # the module computes pooled features for student and teachers
    zero_parts = ("hint",)

    def __init__(
        self,
        normalize: bool = False,
        weight: float = 1.0,
        teachers: Sequence[str | int] | None = None,
    ) -> None:
        super().__init__(weight, teachers)
        self.save_config()  # records normalize, weight, teachers for checkpoints and YAML
        if not isinstance(normalize, bool):
            raise ConfigError(f"PooledHint normalize must be true or false, got {normalize!r}")
        self.normalize = normalize
        self.regressors = nn.ModuleList()

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        # Built here, from the models' widths, so the optimizer sees the parameters.
        d_s = student.num_features
        self.regressors = nn.ModuleList(
            nn.Identity() if t.num_features == d_s else nn.Linear(d_s, t.num_features)
            for t in teachers
        )

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        s = student.pooled.float()
        per_teacher = []
        for regressor, out in zip(self.regressors, teachers, strict=True):
            pred, goal = regressor(s), out.pooled.detach().float()
            if self.normalize:
                pred, goal = F.normalize(pred, dim=-1), F.normalize(goal, dim=-1)
            per_teacher.append((pred - goal).pow(2).mean(-1))  # (B,)
        # Per-sample teacher weights (B, M) from a providing term (UNIC, MST), else uniform.
        return {"hint": teacher_weighted_mean(per_teacher, teacher_weights)}


__all__ = ["PooledHint"]

if __name__ == "__main__":  # a quick look: python examples/custom_term.py
    from visdistill import DistillationModule, ModelConfig

    tiny = dict(name="resnet10t", num_classes=10)
    module = DistillationModule(ModelConfig(**tiny), [ModelConfig(**tiny)], [PooledHint()])
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.arange(4)}
    total, parts, _ = module.compute_losses(batch)
    print({k: round(v.item(), 4) for k, v in parts.items()}, PooledHint().config())
