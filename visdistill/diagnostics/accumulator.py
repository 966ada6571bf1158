"""Layer-by-layer minibatch CKA: a P x Q heat map over a data loader in constant memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .cka import hsic1


def _gram_f32(x: Tensor) -> Tensor:
    """Linear Gram in float32 of features centred over the batch.

    HSIC_1 is invariant to shifting every example's features by the same vector, so the
    centring is exact; it removes the large common component whose cancellation would
    cost float32 its precision. The sums stay float64 (:func:`hsic1` upcasts).
    """
    x = x.reshape(x.shape[0], -1).float()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


class MinibatchCKA(nn.Module):
    """Accumulates unbiased HSIC_1 sums over minibatches (Nguyen et al., 2021).

    Per batch it builds each layer's linear Gram ``(m, m)`` (float32, on batch-centred
    features: 2x faster than float64 and within 1e-6 of it) and adds ``HSIC_1(K_p, L_q)``,
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
        grams_a = torch.stack([_gram_f32(f) for f in feats_a])  # (P, m, m)
        grams_b = torch.stack([_gram_f32(f) for f in feats_b])  # (Q, m, m)
        self.s_aa += hsic1(grams_a, grams_a)
        self.s_bb += hsic1(grams_b, grams_b)
        for p, gram in enumerate(grams_a):  # row by row: O(Q m^2) memory, not O(P Q m^2)
            self.s_ab[p] += hsic1(gram[None], grams_b)
        self.batches += 1

    def compute(self) -> Tensor:
        """The ``(P, Q)`` CKA matrix of everything seen so far (all ranks under DDP).

        Every rank must call it, also a rank that saw no batch (it contributes zeros):
        the check for "no batches at all" comes after the all-reduce, so no rank hangs.
        """
        sums = [self.s_ab.clone(), self.s_aa.clone(), self.s_bb.clone(), self.batches.clone()]
        if dist.is_available() and dist.is_initialized():
            for s in sums:
                dist.all_reduce(s)
        s_ab, s_aa, s_bb, batches = sums
        if batches == 0:
            raise ValueError(
                "MinibatchCKA saw no batches (each needs more than 3 examples); "
                "give it more samples or a larger batch size"
            )
        return s_ab / torch.sqrt(s_aa[:, None] * s_bb[None, :])
