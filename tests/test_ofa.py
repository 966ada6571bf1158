import pytest
import torch
from conftest import CNN, MLP, VIT

from visdistill import ConfigError, DistillationModule, ModelConfig
from visdistill.losses import ofa_loss, soft_cross_entropy
from visdistill.models import Backbone
from visdistill.terms.ofa import OFA, TokenExit, default_exit_stages, is_token_model


def test_ofa_with_eps_one_is_the_soft_cross_entropy():
    z, pt, y = torch.randn(6, 5), torch.randn(6, 5).softmax(-1), torch.randint(0, 5, (6,))
    assert torch.allclose(ofa_loss(z, pt, y, eps=1.0), soft_cross_entropy(z, pt), atol=1e-6)


def test_ofa_weights_match_the_spec_example():
    # p_t = (0.7, 0.2, 0.1), target 0, eps 1.5 -> weights (1.2165, 0.0894, 0.0316).
    z = torch.tensor([[0.3, -0.2, 1.0]])
    log_q = z.log_softmax(-1)[0]
    expected = -(1.2165 * log_q[0] + 0.0894 * log_q[1] + 0.0316 * log_q[2])
    got = ofa_loss(z, torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([0]), eps=1.5)
    assert got.item() == pytest.approx(expected.item(), abs=2e-4)


def test_ofa_temperature_and_extreme_logits_stay_finite():
    z = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    loss = ofa_loss(z, torch.tensor([[0.1, 0.8, 0.1]]), torch.tensor([2]), eps=1.4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("cfg", [CNN, VIT, MLP], ids=["cnn", "vit", "mlp"])
def test_exits_give_logits_for_every_student_family(cfg):
    student = Backbone(**cfg)
    term = OFA(eps=[1.0, 1.1, 1.2, 1.3, 1.4][: len(default_exit_stages(student)) + 1])
    term.setup(student, [Backbone(**CNN)])
    x = torch.rand(3, 3, 32, 32)
    out = student(x, stages=term.student_stages)
    for s in term.student_stages:
        assert term.exits[str(s)](out.stages[s]).shape == (3, 10)
    kind = "TokenExit" if cfg is not CNN else "CNNExit"
    assert {type(e).__name__ for e in term.exits.values()} == {kind}


def test_default_stages_follow_the_paper():
    assert default_exit_stages(Backbone(**CNN)) == (1, 2, 3, 4)  # strides 4..32
    vit12 = Backbone("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(img_size=32))
    assert is_token_model(vit12) and default_exit_stages(vit12) == (1, 3, 9, 11)


def test_token_exit_merges_to_the_final_grid():
    # A 14x14 grid (ViT at 224) needs one 2x2 merger to reach 7x7; 56x56 (Swin-T) three.
    assert len(TokenExit(192, 14, 192, 1, 10).merge) == 1
    assert len(TokenExit(96, 56, 768, 3, 10).merge) == 3
    assert TokenExit(96, 56, 768, 1, 10)(torch.rand(2, 96, 56, 56)).shape == (2, 10)


def test_cnn_exit_downsamples_to_the_last_stage_and_widens_to_max_width():
    student, teacher = Backbone(**CNN), Backbone(**VIT)
    term = OFA(stages=[1])
    term.setup(student, [teacher])
    body = term.exits["1"].body  # stride 4 -> 32: three SepConv halvings, last to 512
    assert len(body) == 3 and body[-1][-3].out_channels == max(512, teacher.num_features)


def test_bad_ofa_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="branch must be one of"):
        OFA(branch="mlp")
    with pytest.raises(ConfigError, match="needs 1 or 5 values"):
        OFA(eps=[1.0, 1.2]).setup(Backbone(**CNN), [Backbone(**CNN)])
    with pytest.raises(ConfigError, match="eps must be >= 1"):
        OFA(eps=0.5).setup(Backbone(**CNN), [Backbone(**CNN)])
    with pytest.raises(ConfigError, match="no stage"):
        OFA(stages=[9]).setup(Backbone(**CNN), [Backbone(**CNN)])


def test_ofa_gradients_reach_student_and_exits_not_teachers():
    module = DistillationModule(
        student=ModelConfig(**VIT),
        teachers=[ModelConfig(**CNN), ModelConfig(**MLP)],
        terms=[OFA(eps=1.3)],
    )
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.tensor([0, 1, 2, 3])}
    loss, parts, _ = module.compute_losses(batch)
    loss.backward()
    assert {"ofa/stage0", "ofa/logits"} <= set(parts)
    assert all(p.grad is not None for p in module.terms[0].exits.parameters())
    assert module.student.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teachers.parameters())
