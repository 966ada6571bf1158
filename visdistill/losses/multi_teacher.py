"""Math shared by the multi-teacher methods (MEAL V2, UNIC, MST-style routing):
per-sample teacher weights, feature-matching and load-balancing losses (method notes:
``docs/methods/meal-v2.md``, ``unic.md``, ``mst.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def teacher_weighted_mean(per_teacher: Sequence[Tensor], weights: Tensor | None) -> Tensor:
    """Batch mean of per-sample losses combined over teachers: ``mean_b sum_m w[b, m] *
    l_m[b]``.

    Args:
        per_teacher: ``M`` per-sample losses, each ``(B,)``.
        weights: per-sample teacher weights ``(B, M)`` (rows sum to 1), or ``None`` for
            uniform ``1 / M``.
    """
    losses = torch.stack(list(per_teacher), 1)  # (B, M)
    if weights is None:
        weights = losses.new_full(losses.shape, 1.0 / losses.shape[1])
    return (weights * losses).sum(1).mean()


def feature_match_loss(pred: Tensor, target: Tensor) -> Tensor:
    """UNIC's per-sample loss ``0.5 (1 - cos) + 0.5 mean_d SmoothL1(pred - target)``.

    Args:
        pred, target: ``(B, D)`` (class/pooled token) or ``(B, L, D)`` (patch tokens: the
            loss is per token, then averaged over tokens).

    Returns:
        ``(B,)``.
    """
    pred, target = pred.float(), target.float()
    per_token = 0.5 * (1 - F.cosine_similarity(pred, target, dim=-1)) + 0.5 * F.smooth_l1_loss(
        pred, target, reduction="none", beta=1.0
    ).mean(-1)
    return per_token if per_token.dim() == 1 else per_token.mean(-1)


def teacher_drop_coefficients(
    losses: Tensor, p: float, normalize: str = "global", generator: torch.Generator | None = None
) -> Tensor:
    """UNIC teacher dropping: per sample keep the worst-matched teacher, drop each other one
    with probability ``p``; no gradient.

    Args:
        losses: ``(B, M)`` per-sample, per-teacher losses.
        p: drop probability of the other teachers.
        normalize: ``"global"`` (the official code: divide by the number of kept pairs in
            the batch) or ``"per_image"`` (each image's kept teachers share weight 1/B).

    Returns:
        ``(B, M)`` coefficients summing to 1 over the whole batch.
    """
    losses = losses.detach()
    rand = torch.rand(losses.shape, generator=generator, device=losses.device)
    worst = F.one_hot(losses.argmax(-1), losses.shape[-1]).bool()
    keep = ((rand >= p) | worst).float()
    if normalize == "global":
        return keep / keep.sum()
    if normalize == "per_image":
        return keep / keep.sum(-1, keepdim=True) / keep.shape[0]
    raise ValueError(f"normalize must be 'global' or 'per_image', got {normalize!r}")


def topk_weights(gates: Tensor, k: int) -> Tensor:
    """``(B, E)`` gate probabilities -> weights ``1/k`` on each sample's top-``k`` experts, 0
    elsewhere (MST's hard selection; rows sum to 1)."""
    idx = gates.topk(k, dim=-1).indices
    return torch.zeros_like(gates).scatter_(-1, idx, 1.0 / k)


def fold_expert_weights(weights: Tensor, n_teachers: int) -> Tensor:
    """Per-sample expert weights ``(B, E)`` -> teacher weights ``(B, M)``, where expert ``e``
    is a variant of teacher ``e % M`` (MST's teacher x mask experts); rows keep their sum."""
    b, e = weights.shape
    if e % n_teachers:
        raise ValueError(f"{e} experts are not a whole number of variants of {n_teachers} teachers")
    return weights.reshape(b, e // n_teachers, n_teachers).sum(1)


def load_balancing_loss(gates: Tensor, mode: str = "kl") -> Tensor:
    """MST's load-balancing loss on router probabilities ``(B, E)``; 0 at uniform use.

    - ``"kl"``: ``KL(uniform || mean_i g_i) / E`` (MST's default, ``batchmean`` over ``E``);
    - ``"cv"``: std / mean of the per-expert importance ``sum_i g_i`` (unbiased std).
    """
    e = gates.shape[-1]
    if mode == "kl":
        mean = gates.mean(0).clamp_min(1e-12)
        return (1.0 / e * (math.log(1.0 / e) - mean.log())).sum() / e
    if mode == "cv":
        importance = gates.sum(0)
        return importance.std() / importance.mean().clamp_min(1e-12)
    raise ValueError(f"load-balancing mode must be 'kl' or 'cv', got {mode!r}")


def discriminator_loss(scores: Tensor, is_teacher: Tensor) -> Tensor:
    """MEAL V2's discriminator BCE: scores ``(N, 2)``, targets one-hot ``(1, 0)`` for
    student rows and ``(0, 1)`` for teacher rows (``is_teacher`` ``(N,)`` bool), averaged
    over all ``N x 2`` entries."""
    target = F.one_hot(is_teacher.long(), 2).to(scores.dtype)
    return F.binary_cross_entropy_with_logits(scores.float(), target.float())
