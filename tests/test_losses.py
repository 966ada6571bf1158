import math

import pytest
import torch

from visdistill import KD, ModelOutput, ensemble_probs, kd_loss, soft_cross_entropy


def test_kd_loss_matches_hand_computation():
    z_s = torch.tensor([[1.0, 2.0, 0.0]])
    p_t = torch.tensor([[0.5, 0.25, 0.25]])
    T = 2.0
    q = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    q = [v / sum(q) for v in q]
    kl = sum(p * (math.log(p) - math.log(qi)) for p, qi in zip((0.5, 0.25, 0.25), q, strict=True))
    assert kd_loss(z_s, p_t, T).item() == pytest.approx(T * T * kl, rel=1e-6)


def test_kd_loss_zero_when_student_equals_teacher():
    z = torch.randn(8, 10)
    assert kd_loss(z, (z / 4).softmax(-1), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_handles_zero_probabilities_and_huge_logits():
    z_s = torch.tensor([[1e4, -1e4, 0.0]])
    p_t = torch.tensor([[1.0, 0.0, 0.0]])
    loss = kd_loss(z_s, p_t, 1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(kd_loss(-z_s, p_t, 1.0))


def test_soft_cross_entropy_equals_ce_on_one_hot():
    z = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 2])
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.allclose(soft_cross_entropy(z, one_hot), torch.nn.functional.cross_entropy(z, y))


def test_ensemble_target_is_mean_of_softened_probabilities():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    outs = [ModelOutput(logits=a), ModelOutput(logits=b)]
    expected = ((a / 2).softmax(-1) + (b / 2).softmax(-1)) / 2
    assert torch.allclose(ensemble_probs(outs, 2.0), expected)
    w = torch.tensor([[1.0, 0.0]] * 3)
    assert torch.allclose(ensemble_probs(outs, 2.0, weights=w), (a / 2).softmax(-1))


def test_kd_term_gradient_reaches_only_the_student():
    z_s = torch.randn(4, 10, requires_grad=True)
    z_t = torch.randn(4, 10, requires_grad=True)
    losses = KD(temperature=3.0)(ModelOutput(z_s), [ModelOutput(z_t.detach())], torch.zeros(4))
    losses["kd"].backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None


def test_kd_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        KD(temperature=0)
