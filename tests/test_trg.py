import pytest
import torch
from conftest import CNN, MLP, VIT

from visdistill import TRG, ConfigError, DistillationModule, ModelConfig
from visdistill.losses import (
    cosine_temperature,
    feature_map_tokens,
    trg_contextual_loss,
    trg_global_loss,
    trg_local_loss,
)


def test_tokens_pool_large_maps_and_upsample_small_ones():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    tok = feature_map_tokens(x, 4)
    assert tok.shape == (1, 16, 1) and tok[0, 0, 0] == (0 + 1 + 8 + 9) / 4
    assert feature_map_tokens(torch.rand(2, 5, 2, 2), 4).shape == (2, 16, 5)


def test_all_three_losses_are_zero_when_the_student_reproduces_the_teacher():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 8)
    nodes = tokens.reshape(-1, 8)
    assert trg_contextual_loss(tokens, tokens).item() < 1e-12
    assert trg_local_loss(nodes, nodes, k=5).abs().item() < 1e-6
    assert trg_global_loss(nodes, nodes, temperature=0.1).abs().item() < 1e-6
    # The local graph is scale-free: each space's bandwidth is its median distance.
    assert trg_local_loss(7.0 * nodes, nodes, k=5).abs().item() < 1e-6


def test_losses_are_positive_for_different_tokens_and_finite_at_extremes():
    torch.manual_seed(0)
    s = (torch.randn(32, 8) * 1e4).requires_grad_()
    t = torch.randn(32, 8)
    losses = [
        trg_local_loss(s, t),
        trg_global_loss(s, t, 0.07),
        trg_contextual_loss(s.view(2, 16, 8), t.view(2, 16, 8)),
    ]
    sum(losses).backward()
    assert all(torch.isfinite(v) and v > 0 for v in losses)
    assert torch.isfinite(s.grad).all()


def test_hard_global_loss_is_infonce_with_the_same_index_as_positive():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    cos = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    expected = torch.nn.functional.cross_entropy(cos / 0.2, torch.arange(5))
    assert torch.allclose(trg_global_loss(s, t, 0.2, hard=True), expected, atol=1e-6)


def test_local_loss_hand_case():
    # 3 nodes on a line (teacher at 0, 1, 3), k = 2: each node's two neighbours.
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [2.0], [3.0]])
    d_t = torch.tensor([[1.0, 9.0], [1.0, 4.0], [9.0, 4.0]])  # to neighbours in index order
    d_s = torch.tensor([[4.0, 9.0], [4.0, 1.0], [9.0, 1.0]])
    sig_t, sig_s = 4.0, 4.0  # medians of the off-diagonal squared distances
    p = torch.exp(-d_t / (2 * sig_t)).softmax(-1)
    q = torch.exp(-d_s / (2 * sig_s)).softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(trg_local_loss(s, t, k=2), expected, atol=1e-6)


def test_temperature_schedule_decays_from_start_to_end():
    assert cosine_temperature(0.0) == pytest.approx(1.0)
    assert cosine_temperature(1.0) == pytest.approx(0.07)
    assert cosine_temperature(0.5) == pytest.approx((1.0 + 0.07) / 2)


@pytest.mark.parametrize("cfg", [CNN, VIT, MLP], ids=["cnn", "vit", "mlp"])
def test_trg_term_for_every_student_family(cfg):
    module = DistillationModule(
        student=ModelConfig(**cfg),
        teachers=[ModelConfig(**CNN), ModelConfig(**VIT)],
        terms=[TRG(student_stage=-1, teacher_stage=[2, -1], grid=4, tokens_per_image=4)],
    )
    assert module.teacher_stages == [(2,), (-1,)]
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.tensor([0, 1, 2, 3])}
    loss, parts, _ = module.compute_losses(batch)
    loss.backward()
    assert {"trg/context", "trg/local", "trg/global"} <= set(parts)
    assert all(torch.isfinite(parts[k]) for k in parts)
    assert all(p.grad is not None for p in module.terms[0].projectors.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())


def test_trg_config_errors():
    with pytest.raises(ConfigError, match="one index per teacher"):
        DistillationModule(
            student=ModelConfig(**CNN),
            teachers=[ModelConfig(**CNN)],
            terms=[TRG(teacher_stage=[1, 2])],
        )
    with pytest.raises(ConfigError, match="grid must be >= 2"):
        TRG(grid=1)
