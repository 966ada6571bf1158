"""Token-level relationship graph losses (Zhang, Liu, He, "Knowledge Distillation via
Token-level Relationship Graph", arXiv 2306.12442).

No official code exists, and parts of the paper's description are ambiguous. Our choices, each kept because it makes the loss exactly zero when
the student reproduces the teacher (and well-posed on images with many identical
background tokens, such as Fashion-MNIST):

- local loss: the student adjacency is built on the *teacher's* kNN edge set, each
  space's Gaussian bandwidth is its median pairwise squared distance (detached), and the
  row softmax runs over the k neighbours only, with ``KL(teacher || student)``;
- global loss: by default a *soft* InfoNCE, whose target for node ``i`` is the
  teacher-teacher similarity distribution ``softmax_j(cos(t_i, t_j) / tau)`` rather than
  a one-hot on ``i`` (``hard=True`` gives the paper's InfoNCE); the loss is
  ``KL(target || softmax_j(cos(s_i, t_j) / tau))``;
- contextual loss: MSE between per-image ``softmax(F F^T / sqrt(D))`` matrices, as the
  spec describes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .kd import _reduce


def feature_map_tokens(feature_map: Tensor, grid: int) -> Tensor:
    """``(B, C, h, w)`` map -> ``(B, grid*grid, C)`` tokens, one per grid cell.

    Larger maps are average-pooled to the grid, smaller ones bilinearly upsampled, so a
    CNN's 2x2 map and a ViT's 4x4 token grid give corresponding tokens.
    """
    h, w = feature_map.shape[-2:]
    if h >= grid and w >= grid:
        x = F.adaptive_avg_pool2d(feature_map, grid)
    else:
        x = F.interpolate(feature_map, size=(grid, grid), mode="bilinear", align_corners=False)
    return rearrange(x, "b c h w -> b (h w) c")


def trg_contextual_loss(student_tokens: Tensor, teacher_tokens: Tensor, reduction: str = "mean"):
    """Per image, MSE between ``softmax(F F^T / sqrt(D))`` of student and teacher.

    Args:
        student_tokens: ``(B, L, D_s)``; teacher_tokens: ``(B, L, D_t)`` (widths may differ:
            the ``(L, L)`` matrices do not depend on them).
        reduction: over images; ``"none"`` gives ``(B,)``.
    """
    cs_s = _context(student_tokens.float())
    cs_t = _context(teacher_tokens.detach().float())
    return _reduce((cs_s - cs_t).pow(2).mean(dim=(1, 2)), reduction)


def _context(tokens: Tensor) -> Tensor:
    return (tokens @ tokens.transpose(1, 2) / math.sqrt(tokens.shape[-1])).softmax(-1)


def trg_local_loss(
    student_nodes: Tensor, teacher_nodes: Tensor, k: int = 8, reduction: str = "mean"
) -> Tensor:
    """Neighbourhood-distribution loss over a kNN token graph.

    ``A_ij = exp(-||x_i - x_j||^2 / (2 sigma))`` on the teacher's ``k`` nearest
    neighbours of node ``i`` (self excluded), in each space with its own ``sigma``
    (median squared distance, detached); loss ``KL(softmax_j A^T_ij || softmax_j A^S_ij)``.

    Args:
        student_nodes: ``(N, D_s)``; teacher_nodes: ``(N, D_t)``; the same N nodes.
        k: neighbours per node (clipped to ``N - 1``).
        reduction: over nodes; ``"none"`` gives ``(N,)``.
    """
    n = teacher_nodes.shape[0]
    if n < 2:
        raise ValueError(f"trg_local_loss needs at least 2 nodes, got {n}")
    k = min(k, n - 1)
    d_t = _squared_distances(teacher_nodes.detach().float())
    d_s = _squared_distances(student_nodes.float())
    eye = torch.eye(n, dtype=torch.bool, device=d_t.device)
    neighbours = d_t.masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    a_t = torch.exp(-d_t.gather(1, neighbours) / (2 * _median_offdiag(d_t, eye)))
    a_s = torch.exp(-d_s.gather(1, neighbours) / (2 * _median_offdiag(d_s.detach(), eye)))
    log_p_t, log_p_s = a_t.log_softmax(-1), a_s.log_softmax(-1)
    per_node = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return _reduce(per_node, reduction)


def _squared_distances(x: Tensor) -> Tensor:
    sq = x.pow(2).sum(-1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0.0)


def _median_offdiag(d: Tensor, eye: Tensor) -> Tensor:
    # Guard: all-identical tokens give a zero median; any positive bandwidth is then exact.
    return d[~eye].median().clamp_min(1e-8)


def trg_global_loss(
    student_nodes: Tensor,
    teacher_nodes: Tensor,
    temperature: float = 0.1,
    hard: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Cross-space contrastive loss: student node ``i`` should pick out teacher node ``i``.

    Args:
        student_nodes: ``(N, D)`` student tokens *projected* into the teacher's width.
        teacher_nodes: ``(N, D)``.
        temperature: ``tau_g`` (scheduled by the term, see :func:`cosine_temperature`).
        hard: the paper's InfoNCE (one-hot target) instead of the soft target.
        reduction: over nodes; ``"none"`` gives ``(N,)``.
    """
    s = F.normalize(student_nodes.float(), dim=-1)
    t = F.normalize(teacher_nodes.detach().float(), dim=-1)
    log_q = (s @ t.T / temperature).log_softmax(-1)
    if hard:
        per_node = -log_q.diagonal()
    else:
        log_p = (t @ t.T / temperature).log_softmax(-1)
        per_node = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _reduce(per_node, reduction)


def cosine_temperature(progress: float, start: float = 1.0, end: float = 0.07) -> float:
    """Temperature decaying from ``start`` to ``end`` on a half cosine as ``progress``
    goes 0 -> 1 (coarse global structure first, sharper negatives later)."""
    p = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * p))
