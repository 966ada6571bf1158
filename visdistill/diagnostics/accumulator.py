"""Layer-by-layer minibatch CKA: a P x Q heat map over a data loader in constant memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class NoCKABatchesError(ValueError):
    """:meth:`MinibatchCKA.compute` with no batch accumulated on any rank."""


def _gram_f32(x: Tensor) -> Tensor:
    """Linear Gram ``(m, m)`` in float32 of features centred over the batch.

    Exact for HSIC_1: shifting every example by the same vector ``c`` adds
    ``u_i + u_j + |c|^2`` (``u_i = <x_i, c>``) to the off-diagonal Gram entries, and the
    U-centring inside HSIC_1 maps exactly such row + column + constant terms to zero, so
    the estimator does not change. The centring removes the large common component whose
    cancellation would cost float32 its precision. Float64 input is centred before the cast.
    """
    x = x.reshape(x.shape[0], -1)
    if x.dtype != torch.float64:
        x = x.float()
    x = (x - x.mean(0, keepdim=True)).float()
    return x @ x.T


def _hsic1_terms(grams: Tensor) -> tuple[Tensor, Tensor]:
    """``(K~ flattened, row sums of K~)`` in float64 for float32 Grams ``(L, m, m)``.

    ``K~`` is the Gram with a zeroed diagonal (``grams`` is modified in place).
    """
    grams.diagonal(dim1=-2, dim2=-1).zero_()
    return grams.flatten(1).double(), grams.sum(-1, dtype=torch.float64)


def _hsic1_cross(terms_a: tuple[Tensor, Tensor], terms_b: tuple[Tensor, Tensor], m: int) -> Tensor:
    """``HSIC_1(K_p, L_q)`` for every pair, ``(P, Q)`` float64, from :func:`_hsic1_terms`.

    Same formula as :func:`~visdistill.diagnostics.cka.hsic1`, with ``tr(K~ L~)`` and
    ``(K~ 1)^T (L~ 1)`` for all pairs as two matrix products.
    """
    (flat_a, rows_a), (flat_b, rows_b) = terms_a, terms_b
    trace = flat_a @ flat_b.T
    middle = rows_a.sum(1)[:, None] * rows_b.sum(1)[None, :] / ((m - 1) * (m - 2))
    last = 2 / (m - 2) * (rows_a @ rows_b.T)
    return (trace + middle - last) / (m * (m - 3))


def _hsic1_self(terms: tuple[Tensor, Tensor], m: int) -> Tensor:
    """``HSIC_1(K_p, K_p)`` for every layer, ``(P,)`` float64."""
    flat, rows = terms
    trace = (flat * flat).sum(1)
    middle = rows.sum(1) ** 2 / ((m - 1) * (m - 2))
    last = 2 / (m - 2) * (rows * rows).sum(1)
    return (trace + middle - last) / (m * (m - 3))


class MinibatchCKA(nn.Module):
    """Accumulates unbiased HSIC_1 sums over minibatches (Nguyen et al., 2021).

    Per batch it builds each layer's linear Gram ``(m, m)`` (float32, on batch-centred
    features, which is exact for HSIC_1: about 2x faster than float64 and within 1e-8 of
    it in CKA) and adds ``HSIC_1(K_p, L_q)`` for all pairs (two float64 matrix products),
    ``HSIC_1(K_p, K_p)`` and ``HSIC_1(L_q, L_q)`` to float64 sums; features are dropped
    right away, so memory does not grow with the number of samples. Because HSIC_1 is
    unbiased, the ratio of averaged sums estimates the population CKA whatever the batch
    size. Under DDP, :meth:`compute` all-reduces the sums.

    Args:
        num_a, num_b: number of layers of model A (rows) and model B (columns).
    """

    def __init__(self, num_a: int, num_b: int) -> None:
        super().__init__()
        self.register_buffer("s_ab", torch.zeros(num_a, num_b, dtype=torch.float64))
        self.register_buffer("s_aa", torch.zeros(num_a, dtype=torch.float64))
        self.register_buffer("s_bb", torch.zeros(num_b, dtype=torch.float64))
        self.register_buffer("batches", torch.zeros((), dtype=torch.float64))

    def reset(self) -> None:
        for buf in (self.s_ab, self.s_aa, self.s_bb, self.batches):
            buf.zero_()

    @torch.no_grad()
    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        """Add one batch: ``feats_a[p]`` ``(m, ...)`` and ``feats_b[q]`` ``(m, ...)``, same examples."""
        if len(feats_a) != self.s_aa.numel() or len(feats_b) != self.s_bb.numel():
            raise ValueError(
                f"expected {self.s_aa.numel()} + {self.s_bb.numel()} layers, "
                f"got {len(feats_a)} + {len(feats_b)}"
            )
        m = feats_a[0].shape[0]
        if m <= 3 or any(f.shape[0] != m for f in [*feats_a, *feats_b]):
            raise ValueError(
                f"every layer needs the same batch of more than 3 examples (got sizes "
                f"{sorted({f.shape[0] for f in [*feats_a, *feats_b]})}); use drop_last=True"
            )
        terms_a = _hsic1_terms(torch.stack([_gram_f32(f) for f in feats_a]))  # P x (m, m)
        terms_b = _hsic1_terms(torch.stack([_gram_f32(f) for f in feats_b]))  # Q x (m, m)
        self.s_aa += _hsic1_self(terms_a, m).to(self.s_aa.device)
        self.s_bb += _hsic1_self(terms_b, m).to(self.s_bb.device)
        self.s_ab += _hsic1_cross(terms_a, terms_b, m).to(self.s_ab.device)
        self.batches += 1

    def compute(self) -> Tensor:
        """The ``(P, Q)`` CKA matrix of everything seen so far (all ranks under DDP).

        Every rank must call it, also a rank that saw no batch (it contributes zeros):
        the check for "no batches at all" comes after the all-reduce, so no rank hangs.
        """
        bufs = (self.s_ab, self.s_aa, self.s_bb, self.batches.reshape(1))
        flat = torch.cat([b.flatten() for b in bufs])  # a copy: one collective, not four
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        s_ab, s_aa, s_bb, batches = (
            part.view_as(b)
            for part, b in zip(flat.split([b.numel() for b in bufs]), bufs, strict=True)
        )
        if batches == 0:
            raise NoCKABatchesError(
                "MinibatchCKA saw no batches (each needs more than 3 examples); "
                "give it more samples or a larger batch size"
            )
        return s_ab / torch.sqrt(s_aa[:, None] * s_bb[None, :])
