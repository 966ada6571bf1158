"""DisWOT's two similarity metrics as pure functions (Dong, Li, Wei, "DisWOT: Student
Architecture Search for Distillation WithOut Training", CVPR 2023, arXiv 2303.15678).

Two distances, each also usable as a distillation loss:

- :func:`ickd_distance`, the inter-channel correlation distance (ICKD, Liu et al. 2021):
  for each of ``N`` items, the ``(C, C)`` matrix ``a a^T`` of its ``(C, D)`` rows with every
  row L2-normalised; the squared Frobenius difference summed over items, divided by
  ``N * C``.
- :func:`similarity_preserving_distance`, the batch-relation distance (SP, Tung & Mori
  2019): the ``(B, B)`` Gram matrix of flattened features, rows L2-normalised; the squared
  Frobenius difference divided by ``B^2``.

DisWOT's metrics are these distances negated, so **higher = more similar = better student
for this teacher**:

- :func:`semantic_similarity` ``M_s = -ickd_distance`` on the ``(K, C)`` gradients of the
  final classifier weights (row ``k``: class ``k``'s channel importance, a Grad-CAM-style
  vector), each class row read as a ``(C, 1)`` item;
- :func:`relation_similarity` ``M_r = -similarity_preserving_distance`` on last-stage
  features.

Both are 0 for identical inputs and at most 0 otherwise.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

CHANNEL_ADAPTERS = ("none", "pool")


def inter_channel_correlation(x: Tensor) -> Tensor:
    """``(N, C, D) -> (N, C, C)``: ``x x^T`` per item, each row L2-normalised."""
    gram = x.float() @ x.float().transpose(1, 2)
    return F.normalize(gram, dim=2)


def ickd_distance(a: Tensor, b: Tensor) -> Tensor:
    """Inter-channel correlation distance between ``a`` and ``b``, both ``(N, C, ...)``.

    ``sum_n ||icc(a)_n - icc(b)_n||_F^2 / (N * C)`` with ``icc`` the row-normalised
    ``(C, C)`` correlation of :func:`inter_channel_correlation`; trailing dimensions are
    flattened into ``D``. Raises :class:`ConfigError` when the shapes differ: the official
    code silently reshapes mismatched tensors (``view(bsz, ch, -1)``), we do not.
    """
    if a.dim() < 2 or tuple(a.shape[:2]) != tuple(b.shape[:2]):
        raise ConfigError(
            f"ickd_distance needs two (N, C, ...) tensors with equal N and C; got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    n, c = a.shape[:2]
    diff = inter_channel_correlation(a.reshape(n, c, -1)) - inter_channel_correlation(
        b.reshape(n, c, -1)
    )
    return diff.pow(2).sum() / (n * c)


def batch_relation(features: Tensor) -> Tensor:
    """``(B, ...) -> (B, B)``: Gram matrix of the flattened features, rows L2-normalised."""
    flat = features.float().reshape(features.shape[0], -1)
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_preserving_distance(a: Tensor, b: Tensor) -> Tensor:
    """SP distance ``||rel(a) - rel(b)||_F^2 / B^2`` between ``(B, ...)`` feature batches.

    Only ``(B, B)`` matrices are compared, so widths and resolutions may differ.
    """
    if a.shape[0] != b.shape[0]:
        raise ConfigError(
            f"similarity_preserving_distance needs the same batch size, got {a.shape[0]} "
            f"and {b.shape[0]}"
        )
    batch = a.shape[0]
    return (batch_relation(a) - batch_relation(b)).pow(2).sum() / batch**2


def pool_channels(x: Tensor, channels: int) -> Tensor:
    """``(K, C) -> (K, channels)`` by averaging adjacent channels (adaptive 1-D average
    pooling over the channel axis); identity when ``C == channels``."""
    if x.shape[-1] == channels:
        return x
    return F.adaptive_avg_pool1d(x.float().unsqueeze(1), channels).squeeze(1)


def semantic_similarity(
    teacher_grad: Tensor, student_grad: Tensor, channel_adapter: str = "none"
) -> Tensor:
    """DisWOT's semantic metric ``M_s`` (higher = more similar, 0 at best).

    Args:
        teacher_grad, student_grad: ``(K, C)`` gradients of the final classifier weights
            (class ``k``'s channel importance in row ``k``).
        channel_adapter: what to do when the channel counts differ. ``"none"`` raises a
            :class:`ConfigError`. ``"pool"`` averages adjacent channels of the wider one down
            to the narrower count (:func:`pool_channels`): at random initialisation channels
            are exchangeable, so a group mean is as good a summary as any fixed projection.
            The class counts ``K`` must always agree.
    """
    if channel_adapter not in CHANNEL_ADAPTERS:
        raise ConfigError(
            f"channel_adapter must be one of {CHANNEL_ADAPTERS}, got {channel_adapter!r}"
        )
    if teacher_grad.dim() != 2 or student_grad.dim() != 2:
        raise ConfigError(
            f"semantic_similarity needs (K, C) classifier-weight gradients, got "
            f"{tuple(teacher_grad.shape)} and {tuple(student_grad.shape)}"
        )
    (k_t, c_t), (k_s, c_s) = teacher_grad.shape, student_grad.shape
    if k_t != k_s:
        raise ConfigError(
            f"teacher and student classifiers predict different class counts ({k_t} vs {k_s}); "
            "build both with the same num_classes"
        )
    if c_t != c_s:
        if channel_adapter == "none":
            raise ConfigError(
                f"classifier gradients have different channel counts: teacher (K, C) = "
                f"({k_t}, {c_t}), student ({k_s}, {c_s}); use channel_adapter='pool' to "
                "average channels down to the narrower width"
            )
        c = min(c_t, c_s)
        teacher_grad, student_grad = pool_channels(teacher_grad, c), pool_channels(student_grad, c)
    return -ickd_distance(student_grad.unsqueeze(-1), teacher_grad.unsqueeze(-1))


def relation_similarity(teacher_features: Tensor, student_features: Tensor) -> Tensor:
    """DisWOT's relation metric ``M_r = -similarity_preserving_distance`` on ``(B, ...)``
    last-stage features (higher = more similar, 0 at best)."""
    return -similarity_preserving_distance(student_features, teacher_features)
