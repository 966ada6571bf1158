"""ND loss: align student features with the direction of the teacher's class mean and
raise their norm (Wang et al., "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction", arXiv 2305.17007 / ECCV 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd import _reduce


def nd_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    class_means: Tensor,
    target: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """``1 - <s_i, e_{y_i}> / max(||s_i||, ||t_i||)`` with ``e_c = mu_c / ||mu_c||``.

    When the student norm reaches the teacher's this is ``1 - cos(s_i, e_{y_i})`` (pure
    direction); below it the gradient ``-e_y / ||t_i||`` also grows the norm. The teacher
    enters only through its norm (detached).

    Args:
        student_emb: ``(B, D)`` student embedding, already projected into the teacher's
            space when widths differ.
        teacher_emb: ``(B, D)`` teacher embedding of the same images.
        class_means: ``(K, D)`` teacher class means (normalised here).
        target: ``(B,)`` class indices, or ``(B, K)`` soft labels (mixup): the class
            directions are then mixed with the same weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).
    """
    if student_emb.shape[-1] != class_means.shape[-1]:
        raise ValueError(
            f"nd_loss: student embedding has {student_emb.shape[-1]} dims but the class "
            f"means have {class_means.shape[-1]}; project the student into the teacher space"
        )
    s = student_emb.float()
    directions = F.normalize(class_means.float(), dim=-1)
    e = directions[target] if target.dim() == 1 else target.float() @ directions
    denom = torch.maximum(s.norm(dim=-1), teacher_emb.detach().float().norm(dim=-1))
    per_sample = 1.0 - (s * e).sum(-1) / denom.clamp_min(1e-12)
    return _reduce(per_sample, reduction)
