"""Teacher-feature normalisers: PHI-S's guarantees, standardisation, inverses, state, errors."""

import math

import pytest
import torch

from visdistill import ConfigError
from visdistill.normalizers import (
    PHIS,
    IdentityNormalizer,
    Standardizer,
    equal_diagonal_rotation,
    hadamard,
    make_normalizer,
)


def _features(n: int = 4000, d: int = 16, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """Correlated, anisotropic features with large channel means (like real teachers')."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or d
    scales = torch.logspace(1, -2, rank, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:, :rank]
    z = torch.randn(n, rank, generator=g, dtype=torch.float64) * scales
    return z @ basis.T + 50 * torch.randn(d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("d", [1, 2, 4, 12, 20, 28, 36, 44, 192, 320, 384, 768, 1152, 1280])
def test_hadamard_is_orthogonal_with_flat_entries(d):
    h = hadamard(d)
    assert h is not None and h.dtype == torch.float64
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(d)))


@pytest.mark.parametrize("d", [3, 6, 10, 52, 92, 100])
def test_hadamard_is_none_where_the_construction_has_no_matrix(d):
    assert hadamard(d) is None


def test_phi_s_gives_every_channel_unit_variance_and_keeps_the_spectrum():
    x = _features()
    norm = PHIS(16).double().fit(x)
    assert norm.rotation_kind == "hadamard"
    y = norm(x)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    # The guarantee: one scale, every channel's variance exactly 1 ...
    assert torch.allclose(cov_y.diagonal(), torch.ones(16, dtype=torch.float64), atol=1e-9)
    assert float(norm.alpha) == pytest.approx(float(cov_x.trace() / 16) ** -0.5, rel=1e-12)
    # ... but not whitening: channels stay correlated, the spectrum is scaled by alpha^2.
    off = cov_y - torch.diag(cov_y.diagonal())
    assert off.abs().max() > 0.1
    alpha = float(norm.alpha)
    expected = torch.linalg.eigvalsh(cov_x) * alpha**2
    assert torch.allclose(torch.linalg.eigvalsh(cov_y), expected, atol=1e-9)
    # Centred, and distances scale by alpha (a scaled rotation).
    assert torch.allclose(y.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(torch.cdist(y[:50], y[50:100]), alpha * torch.cdist(x[:50], x[50:100]))


@pytest.mark.parametrize("d", [10, 52])
def test_phi_s_without_a_hadamard_matrix_still_equalises_exactly(d):
    x = _features(d=d)
    norm = PHIS(d).double().fit(x)
    assert norm.rotation_kind == "equal_diagonal"
    cov_y = torch.cov(norm(x).T)
    assert torch.allclose(cov_y.diagonal(), torch.ones(d, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(norm.inverse(norm(x)), x, atol=1e-9)


def test_equal_diagonal_rotation_by_hand():
    # Two channels, variances 3 and 1: a 45 degree rotation gives 2 and 2.
    q = equal_diagonal_rotation(torch.tensor([3.0, 1.0]))
    m = q @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ q.T
    assert torch.allclose(m.diagonal(), torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(q.abs(), torch.full((2, 2), 0.5**0.5, dtype=torch.float64))


def test_phi_s_rank_deficient_and_dead_channels_stay_finite():
    x = _features(d=16, rank=3)
    x[:, 5] = 7.0  # a dead channel
    norm = PHIS(16).double().fit(x)
    y = norm(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(torch.cov(y.T).diagonal(), torch.ones(16, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(norm.inverse(y), x, atol=1e-9)


def test_phi_s_scale_and_spectrum_do_not_depend_on_the_input_orientation():
    x = _features()
    rot = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    a, b = PHIS(16).double().fit(x), PHIS(16).double().fit(x @ rot.T)
    assert float(a.alpha) == pytest.approx(float(b.alpha), rel=1e-10)
    spec_a = torch.linalg.eigvalsh(torch.cov(a(x).T))
    spec_b = torch.linalg.eigvalsh(torch.cov(b(x @ rot.T).T))
    assert torch.allclose(spec_a, spec_b, atol=1e-9)


@pytest.mark.parametrize("kind", ["phi_s", "standardize", "none"])
def test_inverse_recovers_features_in_every_layout(kind):
    torch.manual_seed(0)
    maps = torch.randn(8, 12, 5, 6) * 3 + 2  # (B, C, H, W)
    norm = make_normalizer(kind, 12).fit(maps)
    tokens = maps.flatten(2).transpose(1, 2)  # (B, N, C)
    for x in (maps, tokens, tokens.reshape(-1, 12)):
        y = norm(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert (norm.inverse(y) - x).abs().max() <= 1e-5
    # The layouts are the same map: channels of a (B, C, H, W) map are dim 1.
    assert torch.allclose(norm(maps).flatten(2).transpose(1, 2), norm(tokens), atol=1e-6)


def test_streamed_estimation_equals_one_fit():
    x = _features(n=3000).float()
    whole = PHIS(16).fit(x)
    streamed = PHIS(16)
    for chunk in x.split(700):
        streamed.accumulate(chunk)
    streamed.finalize()
    assert torch.allclose(whole.mean, streamed.mean, atol=1e-4)
    assert torch.allclose(whole.rotation, streamed.rotation, atol=1e-5)
    assert float(whole.alpha) == pytest.approx(float(streamed.alpha), rel=1e-6)


def test_eigenvector_signs_are_deterministic_across_precisions():
    x = _features()
    assert torch.allclose(PHIS(16).fit(x.float()).rotation, PHIS(16).fit(x).rotation, atol=1e-3)


def test_standardize_gives_zero_mean_unit_variance_and_only_centres_constant_channels():
    x = _features(d=6)
    x[:, 2] = -3.0
    norm = Standardizer(6).double().fit(x)
    y = norm(x)
    assert torch.allclose(y.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-9)
    var = y.var(0)  # unbiased, as fitted
    assert torch.allclose(var[[0, 1, 3, 4, 5]], torch.ones(5, dtype=torch.float64), atol=1e-9)
    assert var[2] == 0 and norm.std[2] == 1
    assert torch.allclose(norm.inverse(y), x, atol=1e-9)


def test_state_dict_round_trip_restores_the_fitted_map():
    x = _features(d=12).float()
    for kind in ("phi_s", "standardize"):
        fitted = make_normalizer(kind, 12).fit(x)
        fresh = make_normalizer(kind, 12)
        assert not fresh.is_fitted
        fresh.load_state_dict(fitted.state_dict())
        assert fresh.is_fitted and torch.equal(fresh(x), fitted(x))
    assert set(PHIS(4).state_dict()) == {"fitted", "mean", "rotation", "alpha"}


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="at least 2 feature vectors"):
        PHIS(4).fit(torch.randn(1, 4))
    with pytest.raises(ConfigError, match="at least 2 feature vectors"):
        Standardizer(4).finalize()  # nothing accumulated
    with pytest.raises(ConfigError, match="built for 4 channels but got 5"):
        PHIS(4).fit(torch.randn(10, 5))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\): dim 1"):
        Standardizer(4).fit(torch.randn(2, 3, 4, 4))
    with pytest.raises(ConfigError, match="takes \\(N, C\\) features"):
        PHIS(4).fit(torch.randn(10))
    with pytest.raises(ConfigError, match="no statistics yet"):
        PHIS(4)(torch.randn(3, 4))
    with pytest.raises(ConfigError, match="no variance"):
        PHIS(4).fit(torch.ones(10, 4))
    with pytest.raises(ConfigError, match="normalize must be one of none, standardize, phi_s"):
        make_normalizer("pca", 4)
    with pytest.raises(ConfigError, match="built for 4 channels"):
        IdentityNormalizer(4)(torch.randn(3, 5))


def _ddp_worker(rank: int, world: int, port: int, out) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        x = _features(n=1000).float()
        # Unequal shares with different means: rank 0 the first 300 rows, rank 1 the rest.
        share = x[:300] if rank == 0 else x[300:]
        for kind in ("phi_s", "standardize"):
            norm = make_normalizer(kind, 16)
            for chunk in share.split(128):
                norm.accumulate(chunk)
            norm.finalize()
            out[(kind, rank)] = {k: v.clone() for k, v in norm.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_statistics_are_merged_across_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    x = _features(n=1000).float()
    for kind in ("phi_s", "standardize"):
        single = make_normalizer(kind, 16).fit(x).state_dict()
        for key, value in single.items():
            assert torch.equal(out[(kind, 0)][key], out[(kind, 1)][key]), key  # same on ranks
            assert torch.allclose(out[(kind, 0)][key].float(), value.float(), atol=1e-4), key


def test_normalisation_ignores_autocast():
    x = _features(d=16).float()
    norm = PHIS(16).fit(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32 and torch.equal(y, norm(x))
