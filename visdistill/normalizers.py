"""Teacher-feature normalisers: ``none``, per-channel standardisation, and PHI-S.

Teachers' features live on wildly different scales (one teacher's channels vary by
hundreds, another's by hundredths), so a plain regression loss summed over teachers
weights them by their variance. A normaliser maps each teacher's features to a
comparable distribution before the loss, and back again (:meth:`FeatureNormalizer.inverse`)
so a student's prediction can be read in the teacher's own space.

PHI-S (PCA-Hadamard Isotropic Standardisation; Ranzinger, Heinrich, Molchanov, Kautz,
Catanzaro, Pavlov, "PHI-S: Distribution Balancing for Label-Free Multi-Teacher
Distillation", arXiv 2410.01680, 2024): with ``mu`` the channel means and ``Sigma = U
diag(e) U^T`` the covariance, ``y = alpha * H U^T (x - mu)`` where ``H`` is a Hadamard
matrix with rows scaled to unit norm and ``alpha = (mean(e))^(-1/2) = (tr Sigma / D)^(-1/2)``.
Since ``H`` spreads every principal direction evenly over all ``D`` output channels,
``cov(y) = alpha^2 H diag(e) H^T`` has every diagonal entry equal to ``alpha^2 mean(e) = 1``:
every channel has variance 1, through one isotropic scale. Unlike whitening the channels
stay correlated (the spectrum is kept, scaled by ``alpha^2``), so rank-deficient features
(most teachers') give no division by ~0.

Widths without a Hadamard matrix: Hadamard matrices exist only for ``D`` = 1, 2 and
multiples of 4, and we build them exactly (Sylvester, Paley I, Paley II and their
Kronecker products, in float64) for every width this construction reaches (all multiples
of 64 up to 2048, 192, 320, 384, 768, 1152 ...). For other widths we do *not* use a random
orthogonal matrix (it leaves the channel variances unequal) nor zero-pad to the next
power of two and truncate (the truncated map is not invertible: the padded channels carry
part of the signal after the rotation). Instead we build, from the fitted spectrum, an
orthogonal ``Q`` with ``Q diag(e) Q^T`` of constant diagonal (it exists for every ``D`` by
the Schur-Horn theorem; ``D - 1`` Givens rotations, each setting one diagonal entry to
``mean(e)``). PHI-S's guarantee (every channel variance 1, one scale, invertible, same
``D``) then holds for every width; only the even spread of each principal direction
over all channels is specific to a Hadamard rotation. ``rotation`` says which was used.

Every normaliser is an ``nn.Module`` whose statistics are buffers, so they are saved and
restored with the run's checkpoint. Estimate them with :meth:`FeatureNormalizer.fit`, or
stream batches through :meth:`~FeatureNormalizer.accumulate` and call
:meth:`~FeatureNormalizer.finalize` (float64 sums, merged across ranks when a distributed
process group is active). Features are ``(N, C)``, ``(B, N, C)`` tokens or ``(B, C, H, W)``
maps; positions count as samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError

NORMALIZERS = ("none", "standardize", "phi_s")


def _channels_last(x: Tensor, dim: int, owner: str) -> tuple[Tensor, tuple[int, ...] | None]:
    """``x`` as ``(..., C)`` and how to undo it: ``(B, C, H, W)`` is permuted; ``(N, C)`` and
    ``(B, N, C)`` are already channel-last."""
    if x.dim() not in (2, 3, 4):
        raise ConfigError(
            f"{owner} takes (N, C) features, (B, N, C) tokens or (B, C, H, W) maps, got shape "
            f"{tuple(x.shape)}"
        )
    channels = x.shape[1] if x.dim() == 4 else x.shape[-1]
    if channels != dim:
        layout = "(B, C, H, W): dim 1" if x.dim() == 4 else "the last dim"
        raise ConfigError(
            f"{owner} was built for {dim} channels but got {channels} ({layout} of shape "
            f"{tuple(x.shape)}); build it with dim={channels} or pass this teacher's features"
        )
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1), (0, 3, 1, 2)
    return x, None


class FeatureNormalizer(nn.Module):
    """Base class: an invertible, data-fitted map of ``dim``-channel features.

    ``forward(x)`` normalises and ``inverse(y)`` maps back, both keeping the layout of
    their input (``(N, C)``, ``(B, N, C)`` or ``(B, C, H, W)``). Buffers hold the fitted
    statistics; the running sums of an estimation pass are not part of the state.

    Args:
        dim: number of channels ``C``.
    """

    kind = "none"
    #: fewest samples (rows, or positions of maps) a fit accepts
    min_samples = 1

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ConfigError(f"a feature normaliser needs dim >= 1, got {dim}")
        self.dim = int(dim)
        self.register_buffer("fitted", torch.tensor(self.kind == "none"))
        self._count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether the statistics have been estimated (or loaded)."""
        return bool(self.fitted)

    # ------------------------------------------------------------------ estimation
    def reset(self) -> None:
        """Forget the running sums of an estimation pass (the fitted buffers stay)."""
        self._count, self._mean, self._m2 = 0, None, None

    @torch.no_grad()
    def accumulate(self, features: Tensor) -> None:
        """Add a batch of features to the running float64 moments (Chan et al.'s pairwise
        update, so large channel means cost no precision)."""
        flat, _ = _channels_last(features.detach(), self.dim, type(self).__name__)
        flat = flat.reshape(-1, self.dim).double()
        n = flat.shape[0]
        if n == 0:
            return
        mean = flat.mean(0)
        centred = flat - mean
        m2 = centred.T @ centred if self._full_covariance else centred.pow(2).sum(0)
        self._merge(n, mean, m2)

    def _merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if self._mean is None:
            self._count, self._mean, self._m2 = n, mean, m2
            return
        total = self._count + n
        delta = mean - self._mean.to(mean.device)
        outer = torch.outer(delta, delta) if self._full_covariance else delta.pow(2)
        self._m2 = self._m2.to(m2.device) + m2 + outer * (self._count * n / total)
        self._mean = self._mean.to(mean.device) + delta * (n / total)
        self._count = total

    def _reduced_moments(self) -> tuple[int, Tensor, Tensor]:
        """``(count, mean, M2)`` over every rank (an all-reduce of sums when distributed)."""
        if self._mean is None:
            count, mean = 0, torch.zeros(self.dim, dtype=torch.float64)
            shape = (self.dim, self.dim) if self._full_covariance else (self.dim,)
            m2 = torch.zeros(shape, dtype=torch.float64)
        else:
            count, mean, m2 = self._count, self._mean, self._m2
        if dist.is_available() and dist.is_initialized():
            device = self.fitted.device
            mean, m2 = mean.to(device), m2.to(device)
            n = torch.tensor([float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(n)
            total = float(n.item())
            summed = mean * count
            dist.all_reduce(summed)
            global_mean = summed / max(total, 1.0)
            delta = mean - global_mean
            outer = torch.outer(delta, delta) if self._full_covariance else delta.pow(2)
            m2 = m2 + outer * count  # this rank's scatter about the global mean
            dist.all_reduce(m2)
            return int(total), global_mean, m2
        return count, mean, m2

    @torch.no_grad()
    def finalize(self) -> FeatureNormalizer:
        """Turn the accumulated moments into the normaliser's buffers; returns ``self``."""
        count, mean, m2 = self._reduced_moments()
        if count < self.min_samples:
            raise ConfigError(
                f"{type(self).__name__} needs at least {self.min_samples} feature vectors to "
                f"estimate its statistics, got {count}; run the estimation pass over more "
                "images (or positions)"
            )
        self._set_statistics(count, mean, m2)
        self.fitted.fill_(True)
        self.reset()
        return self

    def fit(self, features: Tensor) -> FeatureNormalizer:
        """Estimate the statistics from one tensor of features; returns ``self``."""
        self.reset()
        self.accumulate(features)
        return self.finalize()

    # ------------------------------------------------------------------ mapping
    def forward(self, x: Tensor) -> Tensor:
        """Normalised features, same shape and layout as ``x`` (computed in float32 or the
        buffers' dtype, whichever is wider)."""
        return self._map(x, self._normalize)

    def inverse(self, y: Tensor) -> Tensor:
        """Map normalised features (e.g. an adaptor head's output) back to the teacher's
        space; ``inverse(forward(x)) == x`` up to rounding."""
        return self._map(y, self._denormalize)

    def _map(self, x: Tensor, fn) -> Tensor:
        if not self.is_fitted:
            raise ConfigError(
                f"{type(self).__name__} has no statistics yet: call fit(features), or "
                "accumulate(...) then finalize(), before using it (a distillation term does "
                "this when fit starts)"
            )
        last, undo = _channels_last(x, self.dim, type(self).__name__)
        dtype = torch.promote_types(self.fitted_dtype, torch.float32)
        # Targets at full precision: under bf16/fp16 autocast the rotation's matmul would
        # otherwise round every normalised feature to ~3 significant digits.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = fn(last.to(dtype))
        return out.permute(*undo) if undo is not None else out

    @property
    def fitted_dtype(self) -> torch.dtype:
        return torch.float32

    _full_covariance = False

    def _set_statistics(self, count: int, mean: Tensor, m2: Tensor) -> None:
        pass

    def _normalize(self, x: Tensor) -> Tensor:
        return x

    def _denormalize(self, y: Tensor) -> Tensor:
        return y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fitted={self.is_fitted}"


class IdentityNormalizer(FeatureNormalizer):
    """``none``: features pass unchanged (nothing to estimate)."""

    kind = "none"

    def accumulate(self, features: Tensor) -> None:
        _channels_last(features, self.dim, type(self).__name__)

    def finalize(self) -> FeatureNormalizer:
        self.reset()
        return self

    def _map(self, x: Tensor, fn) -> Tensor:
        _channels_last(x, self.dim, type(self).__name__)
        return x


class Standardizer(FeatureNormalizer):
    """Per-channel standardisation ``(x_c - mu_c) / sigma_c`` with the unbiased standard
    deviation; a constant channel (``sigma_c <= eps``) is only centred (``sigma_c = 1``),
    so new inputs are never amplified by ``1 / eps``.

    Args:
        dim: number of channels.
        eps: standard deviations at or below it count as a constant channel.
    """

    kind = "standardize"
    min_samples = 2

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))

    @property
    def fitted_dtype(self) -> torch.dtype:
        return self.mean.dtype

    def _set_statistics(self, count: int, mean: Tensor, m2: Tensor) -> None:
        std = (m2 / (count - 1)).clamp_min(0).sqrt()
        std = torch.where(std > self.eps, std, torch.ones_like(std))
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std))

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _denormalize(self, y: Tensor) -> Tensor:
        return y * self.std.to(y.dtype) + self.mean.to(y.dtype)


class PHIS(FeatureNormalizer):
    """PHI-S: ``y = alpha * R (x - mu)`` with ``R = H U^T`` orthogonal and one scalar
    ``alpha = (tr Sigma / D)^(-1/2)`` (see the module docstring for the math and for widths
    without a Hadamard matrix).

    What it guarantees, on the data it was fitted on: every output channel has variance
    exactly 1 (the covariance's diagonal is all ones, its trace ``D``); the covariance's
    eigenvalues are the input's times ``alpha^2`` (correlations are kept, unlike
    whitening); distances scale by ``alpha`` (``|y_i - y_j| = alpha |x_i - x_j|``).

    Buffers: ``mean`` ``(D,)``, ``rotation`` ``R`` ``(D, D)``, ``alpha`` ``()``. Eigenvector
    signs are made deterministic (largest entry of each positive), so two fits of the same
    data give the same ``R``.

    Args:
        dim: number of channels ``D``.
    """

    kind = "phi_s"
    min_samples = 2
    _full_covariance = True

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("rotation", torch.eye(self.dim))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.rotation_kind = "hadamard" if hadamard(self.dim) is not None else "equal_diagonal"

    @property
    def fitted_dtype(self) -> torch.dtype:
        return self.rotation.dtype

    def _set_statistics(self, count: int, mean: Tensor, m2: Tensor) -> None:
        cov = m2 / (count - 1)
        cov = 0.5 * (cov + cov.T)
        eigvals, eigvecs = torch.linalg.eigh(cov.cpu())
        eigvals = eigvals.clamp_min(0)  # rounding makes null directions slightly negative
        variance = float(eigvals.mean())
        if not variance > 0 or not math.isfinite(variance):
            raise ConfigError(
                f"PHI-S: the features have no variance (tr Sigma / D = {variance}); every "
                "sample is the same vector, so there is nothing to scale. Check the teacher "
                "and the estimation data"
            )
        # Deterministic eigenvector signs: the largest-magnitude entry of each is positive.
        pivot = eigvecs.abs().argmax(0)
        signs = torch.sign(eigvecs.gather(0, pivot[None]).squeeze(0))
        eigvecs = eigvecs * torch.where(signs == 0, torch.ones_like(signs), signs)
        h = hadamard(self.dim)
        if h is None:
            h, self.rotation_kind = equal_diagonal_rotation(eigvals), "equal_diagonal"
        else:
            self.rotation_kind = "hadamard"
        rotation = h @ eigvecs.T
        self.mean.copy_(mean.to(self.mean))
        self.rotation.copy_(rotation.to(self.rotation))
        self.alpha.fill_(1.0 / math.sqrt(variance))

    def _normalize(self, x: Tensor) -> Tensor:
        r, a = self.rotation.to(x.dtype), self.alpha.to(x.dtype)
        return (x - self.mean.to(x.dtype)) @ r.T * a

    def _denormalize(self, y: Tensor) -> Tensor:
        r, a = self.rotation.to(y.dtype), self.alpha.to(y.dtype)
        return (y / a) @ r + self.mean.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rotation={self.rotation_kind!r}"


def make_normalizer(kind: str, dim: int) -> FeatureNormalizer:
    """The normaliser named ``kind`` (``none``, ``standardize`` or ``phi_s``) for ``dim``
    channels."""
    classes = {"none": IdentityNormalizer, "standardize": Standardizer, "phi_s": PHIS}
    if kind not in classes:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZERS)}, got {kind!r}")
    return classes[kind](dim)


# ---------------------------------------------------------------------- rotations
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = chi(j - i)`` over ``Z_q`` (``chi`` the quadratic character), float64."""
    residues = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi.double()[idx]


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley1(q: int) -> Tensor:
    """Order ``q + 1`` for a prime ``q = 3 (mod 4)``: ``I + [[0, 1^T], [-1, Q]]``."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> Tensor:
    """Order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``: the symmetric conference matrix
    ``[[0, 1^T], [1, Q]]`` with 0 -> ``[[1, -1], [-1, -1]]`` and +-1 -> +-``[[1, 1], [1, -1]]``."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _hadamard_unnormalized(d: int) -> Tensor | None:
    if d >= 1 and d & (d - 1) == 0:
        return _sylvester(d)
    if d % 4:
        return None  # no Hadamard matrix of this order exists
    k = (d & -d).bit_length() - 1  # d = 2^k * m, m odd
    for i in range(k - 1, -1, -1):
        p = d >> i
        if _is_prime(p - 1) and (p - 1) % 4 == 3:
            core = _paley1(p - 1)
        elif p % 2 == 0 and _is_prime(p // 2 - 1) and (p // 2 - 1) % 4 == 1:
            core = _paley2(p // 2 - 1)
        else:
            continue
        return torch.kron(_sylvester(1 << i), core)
    return None


def hadamard(d: int) -> Tensor | None:
    """The ``(d, d)`` Hadamard matrix with rows scaled to unit norm (entries ``+-1/sqrt(d)``,
    orthogonal), float64; ``None`` when this construction has none for ``d`` (every ``d`` not
    1, 2 or a multiple of 4, and some multiples of 4 such as 52, 92, 100).

    Built as ``Sylvester(2^i) (x) Paley(p)`` with the smallest ``p = d / 2^i`` for which a Paley
    I (``p - 1`` a prime ``= 3 mod 4``) or Paley II (``p / 2 - 1`` a prime ``= 1 mod 4``) matrix
    exists; powers of two are pure Sylvester. Exact in float64 (entries are +-1 before
    scaling), and checked: ``H H^T = d I``.
    """
    h = _hadamard_unnormalized(int(d))
    if h is None:
        return None
    if not torch.equal(h @ h.T, torch.eye(d, dtype=torch.float64) * d):
        raise AssertionError(f"Hadamard construction of order {d} is not orthogonal")
    return h / math.sqrt(d)


def equal_diagonal_rotation(eigvals: Tensor) -> Tensor:
    """An orthogonal ``Q`` ``(D, D)`` such that ``Q diag(e) Q^T`` has every diagonal entry equal
    to ``mean(e)`` (exists for every ``D``: Schur-Horn theorem), float64.

    ``D - 1`` Givens rotations: each takes the largest and the smallest diagonal entries not
    yet fixed, ``a >= mean >= b``, and rotates their plane by the angle that makes ``a``'s
    entry exactly ``mean`` (the diagonal as a function of the angle moves continuously from
    ``a`` to ``b``); the other diagonal entries are untouched.
    """
    e = eigvals.detach().double().cpu().numpy()
    d = e.size
    m = float(e.mean())
    mat = np.diag(e)
    q = np.eye(d)
    free = np.ones(d, dtype=bool)
    tol = 1e-15 * max(float(np.abs(e).max()), 1e-300)
    for _ in range(d - 1):
        diag = np.where(free, mat.diagonal(), np.nan)
        i, j = int(np.nanargmax(diag)), int(np.nanargmin(diag))
        a, b, c = mat[i, i], mat[j, j], mat[i, j]
        if a - m <= tol and m - b <= tol:
            break
        half = (a - b) / 2
        theta = (
            math.atan2(c, half)
            + math.acos(min(1.0, max(-1.0, (m - (a + b) / 2) / math.hypot(half, c))))
        ) / 2
        g = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        rows = [i, j]
        mat[rows] = g @ mat[rows]
        mat[:, rows] = mat[:, rows] @ g.T
        q[rows] = g @ q[rows]
        mat[i, i] = m  # exact by construction; remove the rounding
        free[i] = False
    return torch.from_numpy(q)
