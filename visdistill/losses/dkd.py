"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
Distillation", CVPR 2022): KD split into a target-class and a non-target-class part."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd import _reduce

_NEG_INF = float("-inf")


def dkd_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
    log_target: bool = False,
) -> Tensor:
    """``alpha * TCKD + beta * NCKD``, both scaled by ``T^2``.

    - TCKD: ``KL(b_t || b_s)`` between the binary distributions ``(p_y, 1 - p_y)``.
    - NCKD: ``KL(p_t' || p_s')`` between the distributions over the non-target classes
      (``p'_c = p_c / (1 - p_y)`` for ``c != y``).

    Everything is computed in log space: the non-target distributions are a
    ``log_softmax`` over the log-probabilities with the target class masked out (mdistiller's
    masked softmax), and ``1 - p_y`` is a ``logsumexp`` over the non-target classes. Nothing
    divides by ``1 - p_y``, which float32 cannot represent for a confident teacher (``p_y``
    rounds to 1 at a target margin of about 17 / T). Takes the teacher as a distribution at
    ``T`` so an ensemble (or per-sample weighted) target composes; pass it as
    log-probabilities (``log_target=True``, e.g. ``log_softmax(z_t / T)`` or
    :func:`~visdistill.teachers.ensemble_log_probs`) to keep non-target probabilities that
    underflow float32 (below ~1e-45, margins above ~100 / T): as probabilities they are 0 and
    their NCKD share is lost.

    Args:
        student_logits: ``(B, K)``.
        teacher_probs: ``(B, K)`` teacher distribution at ``temperature`` (probabilities, or
            log-probabilities with ``log_target=True``).
        target: ``(B,)`` class indices.
        alpha, beta: weights of TCKD and NCKD (mdistiller CIFAR defaults 1 and 8).
        temperature: ``T``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).
        log_target: ``teacher_probs`` holds log-probabilities.
    """
    z = student_logits.float() / temperature
    mask = F.one_hot(target, z.shape[-1]).bool()
    log_ps = F.log_softmax(z, dim=-1)
    log_pt = teacher_probs.float() if log_target else torch.log(teacher_probs.float())
    # TCKD: binary (target, rest) distributions; log(1 - p_y) as a logsumexp, no cancellation.
    log_ps_y, log_ps_rest = _split_target(log_ps, target, mask)
    log_pt_y, log_pt_rest = _split_target(log_pt, target, mask)
    tckd = _kl_terms(log_pt_y, log_ps_y) + _kl_terms(log_pt_rest, log_ps_rest)
    # NCKD: log_softmax over the non-target classes only (target masked before it).
    no_rest = torch.isneginf(log_pt_rest)  # teacher puts all its mass on the target
    log_qt = F.log_softmax(
        log_pt.masked_fill(mask, _NEG_INF).masked_fill(no_rest[:, None], 0.0), dim=-1
    )
    log_qs = F.log_softmax(z.masked_fill(mask, _NEG_INF), dim=-1)
    nckd = _kl_terms(log_qt, log_qs).sum(-1).masked_fill(no_rest, 0.0)
    per_sample = (alpha * tckd + beta * nckd) * temperature**2
    return _reduce(per_sample, reduction)


def _split_target(log_p: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p_y, log(1 - p_y))``, each ``(B,)``, from log-probabilities ``(B, K)``."""
    log_y = log_p.gather(1, target[:, None]).squeeze(1)
    return log_y, torch.logsumexp(log_p.masked_fill(mask, _NEG_INF), dim=-1)


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise ``p * (log p - log q)``, 0 where ``p = 0`` (also where ``q = 0`` there)."""
    p = log_p.exp()
    keep, zero = p > 0, torch.zeros_like(p)
    # Mask both logs (not the product): 0 * (-inf - -inf) would be a NaN gradient.
    return p * (torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero))
