"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
Distillation", CVPR 2022): KD split into a target-class and a non-target-class part."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd import _reduce

_TINY = 1e-12


def dkd_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """``alpha * TCKD + beta * NCKD``, both scaled by ``T^2``.

    - TCKD: ``KL(b_t || b_s)`` between the binary distributions ``(p_y, 1 - p_y)``.
    - NCKD: ``KL(p_t' || p_s')`` between the distributions over the non-target classes,
      renormalised (``p'_c = p_c / (1 - p_y)`` for ``c != y``).

    Takes the teacher as *probabilities* at ``T`` so an ensemble (or per-sample weighted)
    target composes; for one teacher, ``softmax(z_t / T)`` renormalised over the
    non-target classes equals mdistiller's masked softmax. The student side is computed
    in log space (no NaN with logits of magnitude 1e4).

    Args:
        student_logits: ``(B, K)``.
        teacher_probs: ``(B, K)`` teacher distribution at ``temperature``.
        target: ``(B,)`` class indices.
        alpha, beta: weights of TCKD and NCKD (mdistiller CIFAR defaults 1 and 8).
        temperature: ``T``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).
    """
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = teacher_probs.float()
    mask = F.one_hot(target, log_p.shape[-1]).bool()
    # Student: log p_y, log(1 - p_y) = logsumexp over non-target log-probs.
    log_ps_y = log_p.gather(1, target[:, None]).squeeze(1)
    log_ps_rest = torch.logsumexp(log_p.masked_fill(mask, float("-inf")), dim=-1)
    pt_y = p_t.gather(1, target[:, None]).squeeze(1)
    pt_rest = (1.0 - pt_y).clamp_min(0.0)
    tckd = _xlogy_ratio(pt_y, log_ps_y) + _xlogy_ratio(pt_rest, log_ps_rest)
    # Non-target distributions, renormalised.
    log_ps_nt = (log_p - log_ps_rest[:, None]).masked_fill(mask, 0.0)
    pt_nt = (p_t / pt_rest.clamp_min(_TINY)[:, None]).masked_fill(mask, 0.0)
    nckd = _xlogy_ratio(pt_nt, log_ps_nt).sum(-1)
    per_sample = (alpha * tckd + beta * nckd) * temperature**2
    return _reduce(per_sample, reduction)


def _xlogy_ratio(p: Tensor, log_q: Tensor) -> Tensor:
    """``p * (log p - log q)`` with ``0 log 0 = 0``."""
    return torch.xlogy(p, p) - p * log_q
