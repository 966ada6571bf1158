"""Logit distillation losses (Hinton, Vinyals, Dean, "Distilling the Knowledge in a
Neural Network", 2015)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, target_probs: Tensor, reduction: str = "mean") -> Tensor:
    """``-sum_c p_c log softmax(z)_c`` per sample.

    Args:
        logits: ``(B, K)`` student logits.
        target_probs: ``(B, K)`` target distribution (rows sum to 1).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for ``(B,)``.
    """
    per_sample = -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _reduce(per_sample, reduction)


def kd_loss(
    student_logits: Tensor, teacher_probs: Tensor, temperature: float = 4.0, reduction: str = "mean"
) -> Tensor:
    """Hinton KD: ``T^2 * KL(p_T || softmax(z_s / T))``.

    Args:
        student_logits: ``(B, K)``.
        teacher_probs: ``(B, K)`` teacher distribution already softened at ``temperature``
            (for an ensemble: the mean of the teachers' ``softmax(z_m / T)``).
        temperature: ``T``; the ``T^2`` factor keeps gradient magnitudes comparable
            across temperatures.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for ``(B,)``.

    Computed in log space (``log_softmax``), so logits of magnitude 1e4 give no NaN;
    ``p log p`` is taken as 0 where ``p = 0``.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_sample = F.kl_div(log_q, teacher_probs.float(), reduction="none").sum(-1)
    return _reduce(per_sample * temperature**2, reduction)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
