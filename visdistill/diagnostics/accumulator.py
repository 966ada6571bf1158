"""Layer-by-layer minibatch CKA: a P x Q heat map over a data loader in constant memory."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


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


class MinibatchCKA(Metric):
    """Accumulates unbiased HSIC_1 sums over minibatches (Nguyen et al., 2021).

    Per batch it builds each layer's linear Gram ``(m, m)`` (float32, on batch-centred
    features, which is exact for HSIC_1: about 2x faster than float64 and within 1e-8 of
    it in CKA) and adds ``HSIC_1(K_p, L_q)`` for all pairs (two float64 matrix products),
    ``HSIC_1(K_p, K_p)`` and ``HSIC_1(L_q, L_q)`` to float64 sums; features are dropped
    right away, so memory does not grow with the number of samples. Because HSIC_1 is
    unbiased, the ratio of averaged sums estimates the population CKA whatever the batch
    size.

    A ``torchmetrics.Metric``: the four sums are states with ``dist_reduce_fx="sum"``, so
    under DDP :meth:`compute` sums them over ranks (torchmetrics' synchronisation) before
    taking the ratio, and ``reset``, ``.to(device)`` and ``state_dict`` come from it too.

    Args:
        num_a, num_b: number of layers of model A (rows) and model B (columns).
        **kwargs: ``torchmetrics.Metric`` options (``process_group``, ``sync_on_compute``...).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    s_ab: Tensor
    s_aa: Tensor
    s_bb: Tensor
    batches: Tensor

    def __init__(self, num_a: int, num_b: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Persistent, as the buffers of the nn.Module this replaced were: state_dict keeps them.
        for name, shape in (("s_ab", (num_a, num_b)), ("s_aa", (num_a,)), ("s_bb", (num_b,))):
            zeros = torch.zeros(shape, dtype=torch.float64)
            self.add_state(name, zeros, dist_reduce_fx="sum", persistent=True)
        self.add_state(
            "batches", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True
        )

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
        with torch.no_grad():
            terms_a = _hsic1_terms(torch.stack([_gram_f32(f) for f in feats_a]))  # P x (m, m)
            terms_b = _hsic1_terms(torch.stack([_gram_f32(f) for f in feats_b]))  # Q x (m, m)
            self.s_aa += _hsic1_self(terms_a, m).to(self.s_aa.device)
            self.s_bb += _hsic1_self(terms_b, m).to(self.s_bb.device)
            self.s_ab += _hsic1_cross(terms_a, terms_b, m).to(self.s_ab.device)
            self.batches += 1

    def compute(self) -> Tensor:
        """The ``(P, Q)`` CKA matrix of everything seen so far (all ranks under DDP).

        Like every ``torchmetrics.Metric``, a single value (``P = Q = 1``) comes back as a
        0-d tensor.

        Every rank must call it, also a rank that saw no batch (it contributes zeros):
        torchmetrics sums the states over ranks first, and the check for "no batches at
        all" comes after that, so no rank hangs.
        """
        if self.batches == 0:
            raise NoCKABatchesError(
                "MinibatchCKA saw no batches (each needs more than 3 examples); "
                "give it more samples or a larger batch size"
            )
        return self.s_ab / torch.sqrt(self.s_aa[:, None] * self.s_bb[None, :])


@contextmanager
def no_update_warning() -> Iterator[None]:
    """Drop torchmetrics' "compute called before update" warning for :class:`MinibatchCKA`.

    A DDP rank that got no batch still calls ``compute`` (the states are summed over all
    ranks, so it must take part), and with no batch anywhere :meth:`MinibatchCKA.compute`
    raises its own :class:`NoCKABatchesError`: the warning adds nothing in either case.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The ``compute`` method of metric MinibatchCKA was called before",
            category=UserWarning,
        )
        yield
