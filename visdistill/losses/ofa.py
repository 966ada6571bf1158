"""OFA loss with adaptive target enhancement (Hao et al., "One-for-All: Bridge the Gap
Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .kd import _reduce


def ofa_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    target: Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """``-sum_c w_c log softmax(z_s / T)_c`` with ``w_c = (p^t_c + 1[c=y])^eps - 1[c=y]``.

    This is the form the official code trains (not the paper's): the target class gets
    ``(1 + p^t_y)^eps - 1``, every other class ``(p^t_c)^eps``. With ``eps = 1`` it is the
    soft cross-entropy against the teacher; ``eps > 1`` boosts the target class more when
    the teacher is confident on it. No ``T^2`` factor, no hard-label term (the CE is
    separate). Computed with ``log_softmax`` in fp32 (the reference's ``log(softmax)``
    gives NaN under AMP).

    Args:
        student_logits: ``(B, K)`` logits (student head or an exit branch).
        teacher_probs: ``(B, K)`` teacher distribution at ``temperature``.
        target: ``(B,)`` class indices.
        eps: target-enhancement exponent (>= 1; the paper's best is 1.1-1.5).
        temperature: ``T`` of both softmaxes (reference default 1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).
    """
    one_hot = F.one_hot(target, student_logits.shape[-1]).to(teacher_probs.dtype).float()
    weights = (teacher_probs.float() + one_hot).pow(eps) - one_hot
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _reduce(-(weights * log_q).sum(-1), reduction)
