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
