import math

import pytest
import torch
import torch.nn.functional as F

from visdistill.losses import dkd_loss, kd_loss


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_dkd_matches_hand_computed_tckd_and_nckd():
    z = torch.tensor([[2.0, 0.5, -1.0]])
    p_t = torch.tensor([[0.6, 0.3, 0.1]])
    q = z.softmax(-1)[0].tolist()
    tckd = _kl([0.6, 0.4], [q[0], 1 - q[0]])
    nckd = _kl([0.3 / 0.4, 0.1 / 0.4], [q[1] / (1 - q[0]), q[2] / (1 - q[0])])
    got = dkd_loss(z, p_t, torch.tensor([0]), alpha=1.5, beta=2.0, temperature=1.0)
    assert got.item() == pytest.approx(1.5 * tckd + 2.0 * nckd, rel=1e-5)


def test_dkd_equals_mdistiller_masked_softmax_form_for_one_teacher():
    torch.manual_seed(0)
    zs, zt, y, t = torch.randn(6, 7), torch.randn(6, 7), torch.randint(0, 7, (6,)), 4.0
    # mdistiller: non-target distributions via a softmax with the target logit pushed to -1000.
    gt = F.one_hot(y, 7).float()
    ps, pt = (zs / t).softmax(-1), (zt / t).softmax(-1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * t**2
    log_ps2 = F.log_softmax(zs / t - 1000 * gt, 1)
    pt2 = F.softmax(zt / t - 1000 * gt, 1)
    nckd = F.kl_div(log_ps2, pt2, reduction="batchmean") * t**2
    got = dkd_loss(zs, pt, y, alpha=1.0, beta=8.0, temperature=t)
    assert got.item() == pytest.approx((tckd + 8.0 * nckd).item(), rel=1e-4)


def test_kd_decomposes_into_tckd_plus_weighted_nckd():
    # Zhao et al. eq. (1): KD = TCKD + (1 - p^t_y) NCKD, per sample.
    torch.manual_seed(1)
    zs, pt, y = torch.randn(5, 4), torch.randn(5, 4).softmax(-1), torch.randint(0, 4, (5,))
    tckd = dkd_loss(zs, pt, y, alpha=1.0, beta=0.0, temperature=1.0, reduction="none")
    nckd = dkd_loss(zs, pt, y, alpha=0.0, beta=1.0, temperature=1.0, reduction="none")
    pt_y = pt.gather(1, y[:, None]).squeeze(1)
    kd = kd_loss(zs, pt, temperature=1.0, reduction="none")
    assert torch.allclose(tckd + (1 - pt_y) * nckd, kd, atol=1e-5)


def test_dkd_is_zero_when_student_matches_teacher_and_finite_at_extremes():
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert dkd_loss(z, (z / 4).softmax(-1), y).abs().item() < 1e-5
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    pt = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # teacher disagrees completely
    loss = dkd_loss(big, pt, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


def _dkd_float64(zs, zt, y, alpha, beta, t):
    """Reference DKD in float64 from logits: mdistiller's masked-softmax form."""
    zs, zt = zs.double() / t, zt.double() / t
    mask = F.one_hot(y, zs.shape[1]).bool()
    lps, lpt = zs.log_softmax(-1), zt.log_softmax(-1)
    lps_y, lpt_y = lps.gather(1, y[:, None])[:, 0], lpt.gather(1, y[:, None])[:, 0]
    lps_r = torch.logsumexp(lps.masked_fill(mask, -math.inf), -1)
    lpt_r = torch.logsumexp(lpt.masked_fill(mask, -math.inf), -1)
    tckd = lpt_y.exp() * (lpt_y - lps_y) + lpt_r.exp() * (lpt_r - lps_r)
    ns = zs.masked_fill(mask, -math.inf).log_softmax(-1).masked_fill(mask, 0)
    nt = zt.masked_fill(mask, -math.inf).log_softmax(-1).masked_fill(mask, 0)
    nckd = (nt.exp().masked_fill(mask, 0) * (nt - ns)).sum(-1)
    return (alpha * tckd + beta * nckd) * t**2


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("margin", [10.0, 30.0, 60.0, 200.0])
def test_dkd_matches_a_float64_reference_for_confident_teachers(margin, t):
    # Before the log-space rewrite (p / (1 - p_y) in float32), T=1 gave 843.6 instead of 12.58
    # at margin 30 and 4.90 instead of 13.72 at margin 200.
    torch.manual_seed(0)
    y = torch.randint(0, 100, (8,))
    zt = torch.randn(8, 100)
    zt[torch.arange(8), y] += margin
    zs = torch.randn(8, 100, requires_grad=True)
    ref = _dkd_float64(zs.detach(), zt, y, 1.0, 8.0, t)
    got = dkd_loss(zs, (zt / t).log_softmax(-1), y, 1.0, 8.0, t, reduction="none", log_target=True)
    assert torch.allclose(got.double(), ref, rtol=5e-6, atol=1e-6)  # measured <= 2.6e-6
    # Gradients too (the reference's, by autograd in float64): measured <= 4.3e-6 of the largest.
    got.sum().backward()
    zs64 = zs.detach().double().requires_grad_()
    _dkd_float64(zs64, zt, y, 1.0, 8.0, t).sum().backward()
    assert (zs.grad.double() - zs64.grad).abs().max() <= 1e-5 * zs64.grad.abs().max()
    if margin <= 60 or t > 1:  # probabilities that float32 still holds: the same answer
        probs = dkd_loss(zs, (zt / t).softmax(-1), y, 1.0, 8.0, t, reduction="none")
        assert torch.allclose(probs.double(), ref, rtol=1e-5, atol=1e-6)


def test_dkd_term_uses_log_space_teacher_targets():
    from visdistill import DKD, ModelOutput, ensemble_log_probs, ensemble_probs

    torch.manual_seed(0)
    y = torch.randint(0, 100, (4,))
    zt = torch.randn(4, 100)
    zt[torch.arange(4), y] += 200.0
    zs = torch.randn(4, 100)
    term = DKD(alpha=1.0, beta=8.0, temperature=1.0)
    got = term(ModelOutput(zs), [ModelOutput(zt)], y)["dkd"]
    assert got.item() == pytest.approx(_dkd_float64(zs, zt, y, 1.0, 8.0, 1.0).mean().item(), 1e-5)
    # The ensemble's log-probabilities are the log of its probabilities (uniform and weighted).
    outs = [ModelOutput(torch.randn(4, 7)), ModelOutput(torch.randn(4, 7))]
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    for weights in (None, w):
        log_p = ensemble_log_probs(outs, 2.0, weights)
        assert torch.allclose(log_p.exp(), ensemble_probs(outs, 2.0, weights), atol=1e-6)


def test_dkd_teacher_with_all_mass_on_the_target_has_zero_nckd_and_finite_gradients():
    zs = torch.randn(2, 5, requires_grad=True)
    pt = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0]])
    y = torch.tensor([0, 2])
    nckd = dkd_loss(zs, pt, y, alpha=0.0, beta=1.0, temperature=1.0, reduction="none")
    assert torch.equal(nckd, torch.zeros(2))
    dkd_loss(zs, pt, y).backward()
    assert torch.isfinite(zs.grad).all()
