"""Dense-feature and dense-logit distillation losses for detectors (FPN levels, anchor logits).

Pure functions on ``(B, C, H, W)`` maps. The ND-style term reuses :func:`~visdistill.losses.nd_loss`
per spatial position and the softmax logit term reuses :func:`~visdistill.losses.kd_loss` per anchor;
the FitNets, channel-wise and binary (sigmoid) KD losses are defined here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd import _reduce, kd_loss
from .nd import nd_loss


def _check_maps(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} must "
            "both be (B, C, H, W) of the same shape; project the student's channels (a 1x1 conv) and "
            "use levels of the same stride"
        )


def positions(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B * H * W, C)``: one C-dimensional vector per spatial position."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def fitnet_loss(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015):
    ``mean_{b,c,h,w} (s - t)^2``.

    Args:
        student: ``(B, C, H, W)`` student map, already projected to the teacher's ``C``
            (the regressor: a 1x1 conv).
        teacher: ``(B, C, H, W)`` teacher map (detached here).
        reduction: ``"mean"`` over all elements, ``"sum"``, or ``"none"`` for ``(B,)`` (mean per image).
    """
    _check_maps("fitnet_loss", student, teacher)
    sq = (student.float() - teacher.detach().float()).pow(2)
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return _reduce(sq.flatten(1).mean(1), reduction)


def channel_wise_loss(
    student: Tensor, teacher: Tensor, temperature: float = 4.0, reduction: str = "mean"
) -> Tensor:
    """Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
    Prediction", ICCV 2021): each channel becomes a distribution over the ``H * W`` positions,
    ``p_c = softmax(y_c / T)``, and the student matches the teacher's with
    ``T^2 / C * sum_c KL(p_c^T || p_c^S)``.

    Args:
        student: ``(B, C, H, W)`` student map (projected to the teacher's ``C``).
        teacher: ``(B, C, H, W)`` teacher map (detached here).
        temperature: ``T``; the ``T^2`` factor keeps gradients comparable across ``T``.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` for ``(B,)``.
    """
    _check_maps("channel_wise_loss", student, teacher)
    b, c = student.shape[:2]
    log_q = F.log_softmax(student.float().reshape(b, c, -1) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach().float().reshape(b, c, -1) / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # (B, C)
    return _reduce(kl.mean(1) * temperature**2, reduction)


def nd_feature_loss(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """ND-style norm and direction loss at every position of a feature map: :func:`nd_loss` with
    the teacher's own vector at each position as the direction,
    ``1 - <s_i, t_i / ||t_i||> / max(||s_i||, ||t_i||)``.

    Dense prediction has no image-level class, so the class-mean direction of the ND paper
    (Wang et al., arXiv 2305.17007) is replaced by the teacher's feature direction at the same
    position; the norm part (grow the student's norm to at least the teacher's) is unchanged.

    Args:
        student: ``(B, C, H, W)`` student map (projected to the teacher's ``C``).
        teacher: ``(B, C, H, W)`` teacher map (detached here).
        reduction: ``"mean"`` over all positions, ``"sum"``, or ``"none"`` for ``(B,)`` (mean per image).
    """
    _check_maps("nd_feature_loss", student, teacher)
    s, t = positions(student), positions(teacher.detach())
    index = torch.arange(s.shape[0], device=s.device)
    per_position = nd_loss(s, t, t, index, reduction="none")
    if reduction == "none":
        return per_position.reshape(student.shape[0], -1).mean(1)
    return _reduce(per_position, reduction)


def anchor_logits(cls_score: Tensor, num_classes: int) -> Tensor:
    """A dense head's ``(B, A * K, H, W)`` class scores as ``(B * H * W * A, K)`` rows (mmdet's layout:
    anchor-major channels, ``K`` classes per anchor)."""
    b, ak, h, w = cls_score.shape
    if ak % num_classes:
        raise ValueError(
            f"class-score map has {ak} channels, not a multiple of num_classes={num_classes}"
        )
    return cls_score.permute(0, 2, 3, 1).reshape(-1, num_classes)


def binary_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """KD for sigmoid classifiers (RetinaNet, FCOS: one independent binary problem per class):
    ``T^2 * sum_k BCE(sigmoid(t_k / T), sigmoid(s_k / T)) - H(sigmoid(t_k / T))``, i.e. the binary
    KL divergence per class, summed over classes.

    Args:
        student_logits: ``(N, K)`` student logits (``N`` anchors or samples).
        teacher_logits: ``(N, K)`` teacher logits (detached here).
        temperature: ``T``.
        reduction: ``"mean"`` over the ``N`` rows, ``"sum"``, or ``"none"`` for ``(N,)``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"binary_kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the heads need the same anchors and classes"
        )
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    p = torch.sigmoid(t)
    # BCE(p, s) - BCE(p, t): the entropy of p cancels, leaving KL(Bern(p) || Bern(sigmoid(s))) >= 0.
    kl = F.binary_cross_entropy_with_logits(
        s, p, reduction="none"
    ) - F.binary_cross_entropy_with_logits(t, p, reduction="none")
    return _reduce(kl.sum(-1) * temperature**2, reduction)


def softmax_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Hinton KD per row (:func:`kd_loss` with the teacher softened at ``temperature``): for
    softmax classifiers (Faster R-CNN's RoI head, heads with ``use_sigmoid=False``).

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)`` (detached here).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"softmax_kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the heads need the same anchors and classes"
        )
    probs = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return kd_loss(student_logits, probs, temperature, reduction)
