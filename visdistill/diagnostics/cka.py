"""Centered Kernel Alignment (Kornblith, Norouzi, Lee, Hinton, ICML 2019) and the unbiased
HSIC_1 estimator (Nguyen, Raghu, Kornblith, ICLR 2021).

All functions take representations of the same ``n`` examples as ``(n, p)`` tensors (or
``(n, C, H, W)`` maps, flattened) and compute in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def gram_linear(x: Tensor) -> Tensor:
    """Linear kernel ``X X^T``, ``(n, n)``, for ``x`` ``(n, ...)``."""
    x = _flat(x)
    return x @ x.T


def gram_rbf(x: Tensor, sigma_frac: float = 1.0) -> Tensor:
    """RBF kernel ``exp(-d^2 / (2 sigma^2))`` with ``sigma^2 = sigma_frac^2 * median(d^2)``.

    ``d^2`` are the pairwise squared distances; the median is over all ``n^2`` entries, as
    in the reference implementation.
    """
    x = _flat(x)
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    # quantile(0.5) averages the two middle values like np.median (torch.median takes the lower).
    sigma2 = sigma_frac**2 * d2.flatten().quantile(0.5)
    return torch.exp(-d2 / (2 * sigma2))


def center_gram(gram: Tensor, unbiased: bool = False) -> Tensor:
    """Centre a Gram matrix ``(n, n)``: ``H K H``, or its U-centred (debiased) form."""
    gram = gram.double().clone()
    n = gram.shape[0]
    if not unbiased:
        gram -= gram.mean(0, keepdim=True)
        gram -= gram.mean(1, keepdim=True)
        return gram
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    gram.fill_diagonal_(0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    gram.fill_diagonal_(0)
    return gram


def cka_from_grams(gram_k: Tensor, gram_l: Tensor, debiased: bool = False) -> Tensor:
    """CKA of two ``(n, n)`` Gram matrices."""
    kc, lc = center_gram(gram_k, debiased), center_gram(gram_l, debiased)
    return (kc * lc).sum() / (kc.norm() * lc.norm())


def linear_cka(x: Tensor, y: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA of ``x`` ``(n, ...)`` and ``y`` ``(n, ...)``; a scalar in ``[0, 1]``."""
    return cka_from_grams(gram_linear(x), gram_linear(y), debiased)


def rbf_cka(x: Tensor, y: Tensor, sigma_frac: float = 1.0, debiased: bool = False) -> Tensor:
    """RBF CKA, bandwidth a fraction of the median distance (see :func:`gram_rbf`)."""
    return cka_from_grams(gram_rbf(x, sigma_frac), gram_rbf(y, sigma_frac), debiased)


def hsic1(gram_k: Tensor, gram_l: Tensor) -> Tensor:
    """Unbiased HSIC_1 of Gram matrices ``(n, n)`` (or batches ``(..., n, n)``), ``n > 3``.

    Uses the elementwise identities ``tr(K~L~) = sum K~*L~`` and
    ``1^T K~ L~ 1 = (K~ 1)^T (L~ 1)``: O(n^2), no n^3 product.
    """
    n = gram_k.shape[-1]
    if n <= 3:
        raise ValueError(f"HSIC_1 needs more than 3 examples per batch, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=gram_k.device)
    k_t = gram_k.double().masked_fill(eye, 0)  # K~: zero diagonal
    l_t = gram_l.double().masked_fill(eye, 0)
    k_rows, l_rows = k_t.sum(-1), l_t.sum(-1)
    trace = (k_t * l_t).sum((-2, -1))
    middle = k_rows.sum(-1) * l_rows.sum(-1) / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (k_rows * l_rows).sum(-1)
    return (trace + middle - last) / (n * (n - 3))
