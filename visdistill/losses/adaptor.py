"""Adaptor-head losses and teacher balancing for agglomerative (RADIO-style) distillation:
each teacher's summary and spatial features predicted by the student's adaptor heads
(Ranzinger, Heinrich, Kautz, Molchanov, "AM-RADIO: Agglomerative Vision Foundation Model",
CVPR 2024). Pure functions: tensors in, tensors out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def adaptor_match_loss(
    pred: Tensor,
    target: Tensor,
    cosine_weight: float = 1.0,
    smooth_l1_weight: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """Per-sample ``cosine_weight * (1 - cos(pred, target)) + smooth_l1_weight *
    mean_d SmoothL1_beta(pred - target)``, computed in float32.

    Args:
        pred, target: ``(B, D)`` summaries, or ``(B, L, D)`` tokens (the loss is per token,
            then averaged over the ``L`` tokens).
        cosine_weight, smooth_l1_weight: weights of the two parts.
        beta: SmoothL1's quadratic-to-linear threshold.

    Returns:
        ``(B,)``.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"adaptor prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        )
    pred, target = pred.float(), target.float()
    per_token = pred.new_zeros(pred.shape[:-1])
    if cosine_weight:
        per_token = per_token + cosine_weight * (1 - F.cosine_similarity(pred, target, dim=-1))
    if smooth_l1_weight:
        sl1 = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(-1)
        per_token = per_token + smooth_l1_weight * sl1
    return per_token if per_token.dim() == 1 else per_token.flatten(1).mean(-1)


def fixed_balance(losses: Tensor, weights: Tensor | None = None) -> Tensor:
    """Each teacher's share of the loss with fixed teacher weights, normalised to sum to 1:
    ``w_t / sum(w) * mean_b losses[b, t]``.

    Args:
        losses: ``(B, M)`` per-sample, per-teacher losses.
        weights: ``(M,)`` non-negative weights (``None``: equal).

    Returns:
        ``(M,)``; its sum is the balanced loss.
    """
    if weights is None:
        weights = losses.new_ones(losses.shape[1])
    weights = weights.to(losses)
    return weights / weights.sum() * losses.mean(0)


def adaptive_balance(losses: Tensor, running_mean: Tensor) -> Tensor:
    """AdaLoss-style balancing: each teacher's batch loss divided by its running mean (no
    gradient through the divisor), averaged over teachers, so a teacher whose loss is large
    in absolute terms does not dominate: ``mean_b losses[b, t] / (M * running_mean[t])``.

    Args:
        losses: ``(B, M)`` per-sample, per-teacher losses.
        running_mean: ``(M,)`` positive running means of each teacher's batch loss.

    Returns:
        ``(M,)``; its sum is the balanced loss (about 1 at the running means).
    """
    m = losses.shape[1]
    return losses.mean(0) / (m * running_mean.detach().to(losses).clamp_min(1e-12))


def ema_update(running: Tensor, value: Tensor, momentum: float, initialized: Tensor) -> Tensor:
    """``momentum * running + (1 - momentum) * value`` where ``initialized``, else ``value``
    (the first observation starts the average). All ``(M,)``; no gradient."""
    value = value.detach().to(running)
    return torch.where(initialized, momentum * running + (1 - momentum) * value, value)
