"""MEAL V2 term: formulas on hand-computed tensors, discriminator inputs and widths, a real
fit. (More in test_multi_teacher.py: the plain soft-CE identity, official widths and
127,047 parameters, the GRL sign flip, teachers get no gradient.)"""

import pytest
import torch
import torch.nn.functional as F
from conftest import CNN, VIT, fit_two_steps

from visdistill import MEALV2, ConfigError, DistillationModule, ModelConfig
from visdistill.models import ModelOutput
from visdistill.terms.meal_v2 import OutputDiscriminator

ZS = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
T1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
T2 = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([0, 1])


def _term(mode="joint", **kw):
    term = MEALV2(mode=mode, **kw)
    if mode != "none":
        term.discriminator = OutputDiscriminator(3, kw.get("final_relu", True))
    return term


def test_soft_ce_target_follows_per_sample_teacher_weights():
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    target = w[:, :1] * T1.softmax(-1) + w[:, 1:] * T2.softmax(-1)
    by_hand = -(target * ZS.log_softmax(-1)).sum(-1).mean()
    out = _term("none")(ModelOutput(ZS), [ModelOutput(T1), ModelOutput(T2)], Y, teacher_weights=w)
    assert torch.allclose(out.losses["soft_ce"], by_hand)


@pytest.mark.parametrize("weights", [None, torch.tensor([[1.0, 0.0], [0.25, 0.75]])])
def test_discriminator_sees_student_logits_then_the_mean_teacher_logits(weights):
    term = _term("joint")
    seen = []
    term.discriminator.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    out = term(ModelOutput(ZS), [ModelOutput(T1), ModelOutput(T2)], Y, teacher_weights=weights)
    w = torch.full((2, 2), 0.5) if weights is None else weights
    mean_logits = w[:, :1] * T1 + w[:, 1:] * T2
    x, scores = seen[0]
    assert torch.allclose(x, torch.cat([ZS, mean_logits]))
    # BCE-with-logits averaged over the 2B x 2 entries; student rows (1, 0), teacher rows (0, 1).
    y = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 2)
    s = scores.sigmoid()
    by_hand = -(y * s.log() + (1 - y) * (1 - s).log()).sum() / 8
    assert torch.allclose(out.losses["disc"], by_hand, atol=1e-6)
    assert (scores >= 0).all()  # the official final ReLU
    # Diagnostic, not a loss: the share of the 2B rows the discriminator classifies right.
    right = (scores.argmax(-1) == torch.tensor([0, 0, 1, 1])).float().mean()
    assert "disc_acc" not in out.losses and torch.equal(out.metrics["disc_acc"], right)


def test_prob_input_is_the_fkd_variant():
    term = _term("joint", disc_input="prob")
    seen = []
    term.discriminator.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    term(ModelOutput(ZS), [ModelOutput(T1), ModelOutput(T2)], Y)
    target = (T1.softmax(-1) + T2.softmax(-1)) / 2
    assert torch.allclose(seen[0], torch.cat([ZS.softmax(-1), target]))


def test_small_class_guard_and_final_relu_flag():
    assert OutputDiscriminator(100).widths == [100, 12, 4, 2]  # 100 // 64 = 1 -> 4
    assert OutputDiscriminator(10, min_hidden=2).widths == [10, 2, 2, 2]
    term = MEALV2(disc_min_hidden=2, final_relu=False)
    term.setup(_Stub(10), [])
    assert term.discriminator.widths == [10, 2, 2, 2]
    assert isinstance(term.discriminator[-1], torch.nn.Linear)
    assert sum(p.numel() for p in OutputDiscriminator(10).parameters()) == 74  # quickstart
    none = MEALV2(mode="none")
    none.setup(_Stub(10), [])
    assert none.discriminator is None and not list(none.parameters())


class _Stub:
    def __init__(self, num_classes):
        self.num_classes = num_classes


@pytest.mark.parametrize("mode", ["joint", "grl", "none"])
@pytest.mark.parametrize("disc_input", ["logit_mean", "prob"])
def test_no_nan_at_logits_1e4(mode, disc_input):
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 0.0, 1e4]], requires_grad=True)
    teachers = [ModelOutput(torch.tensor([[-1e4, 1e4, 0.0]] * 2)), ModelOutput(T1 * 1e4)]
    out = _term(mode, disc_input=disc_input)(ModelOutput(zs), teachers, Y)
    total = sum(out.losses.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(zs.grad).all()


def test_joint_mode_minimises_the_discriminator_loss_through_the_student():
    # joint: a small step of the student's logits along -grad lowers the disc loss (the
    # official regulariser); grl: the same step raises it (the student fools the discriminator).
    def disc_after_step(mode):
        torch.manual_seed(0)
        term = MEALV2(mode=mode, final_relu=False)
        term.discriminator = OutputDiscriminator(64, final_relu=False)
        teachers = [ModelOutput(torch.randn(8, 64)), ModelOutput(torch.randn(8, 64))]
        zs = torch.randn(8, 64, requires_grad=True)
        before = term(ModelOutput(zs), teachers, Y).losses["disc"]
        before.backward()
        step = 1e-2 * zs.grad / zs.grad.norm()
        with torch.no_grad():
            after = term(ModelOutput(zs - step), teachers, Y).losses["disc"]
        return before.item(), after.item()

    before, after = disc_after_step("joint")
    assert after < before
    before, after = disc_after_step("grl")
    assert after > before


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match=r"mode must be one of \('joint', 'grl', 'none'\)"):
        MEALV2(mode="adversarial")
    with pytest.raises(ConfigError, match=r"disc_input must be one of \('logit_mean', 'prob'\)"):
        MEALV2(disc_input="logits")
    with pytest.raises(ConfigError, match="disc_min_hidden"):
        MEALV2(disc_min_hidden=0)
    with pytest.raises(ConfigError, match="disc_lr_scale must be > 0"):
        MEALV2(disc_lr_scale=0)


def test_discriminator_lr_is_its_own_group_and_schedulers_keep_the_ratio():
    module = DistillationModule(
        ModelConfig(**CNN),
        [ModelConfig(**CNN)],
        [MEALV2(mode="grl", disc_lr_scale=0.01)],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    )
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    student_group, disc_group = optimizer.param_groups
    disc = {id(p) for p in module.terms[0].discriminator.parameters()}
    assert {id(p) for p in disc_group["params"]} == disc
    assert not disc & {id(p) for p in student_group["params"]}
    assert len(student_group["params"]) == len(list(module.student.parameters()))
    assert student_group["lr"] == 0.1 and disc_group["lr"] == pytest.approx(1e-3)
    for _ in range(2):  # the official code's bug: one lr written to every group each epoch
        optimizer.step()
        scheduler.step()
    assert disc_group["lr"] / student_group["lr"] == pytest.approx(0.01)
    assert student_group["lr"] == pytest.approx(0.05)  # cos(pi / 2) halfway through
    # Scale 1 (the default) leaves a single group, as without the option.
    plain = DistillationModule(ModelConfig(**CNN), [ModelConfig(**CNN)], [MEALV2()])
    assert len(plain.configure_optimizers().param_groups) == 1


@pytest.mark.parametrize("mode", ["joint", "grl"])
def test_meal_v2_fits_with_a_lightning_trainer(tmp_path, mode):
    module = DistillationModule(
        ModelConfig(**CNN),
        [ModelConfig(**CNN), ModelConfig(**VIT)],
        [MEALV2(mode=mode)],
        ce_weight=0.0,  # MEAL V2's label-free recipe
    )
    trainer, steps = fit_two_steps(module, tmp_path)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.0 <= float(trainer.callback_metrics["train/meal_v2/disc_acc"]) <= 1.0
    assert len(steps) == 2
    for norms in steps:
        assert all(v is not None for v in norms.values()) and sum(norms.values()) > 0


def test_official_recipe_pieces_are_reachable_from_the_config():
    # The student starts from weights given in its ModelConfig (pretrained / checkpoint) and
    # trains without labels (ce_weight 0); with mode "none" only the soft CE remains.
    module = DistillationModule(
        ModelConfig(**CNN), [ModelConfig(**CNN)], [MEALV2(mode="none")], ce_weight=0.0
    )
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.zeros(4, dtype=torch.long)}
    total, parts, out = module.compute_losses(batch)
    assert set(parts) == {"ce", "meal_v2/soft_ce"}
    assert torch.allclose(total, parts["meal_v2/soft_ce"])
    assert F.cross_entropy(out.logits, batch["target"]).item() == pytest.approx(parts["ce"].item())


def test_discriminator_width_reduction_is_an_argument():
    assert OutputDiscriminator(1000).widths == [1000, 125, 15, 2]  # official K = 8
    assert sum(p.numel() for p in OutputDiscriminator(1000).parameters()) == 127047
    assert OutputDiscriminator(1000, reduction=4).widths == [1000, 250, 62, 2]
    term = MEALV2(disc_reduction=2)
    term.setup(_Stub(100), [])
    assert term.discriminator.widths == [100, 50, 25, 2]
    assert term.config()["init_args"]["disc_reduction"] == 2
    with pytest.raises(ConfigError, match="disc_reduction must be >= 1"):
        MEALV2(disc_reduction=0)


def test_logit_mean_discriminator_with_the_teacher_cache_is_refused():
    # The cache holds top-k log-probabilities: their mean is not the teachers' mean logit.
    kw = dict(student=ModelConfig(**CNN), teachers=[ModelConfig(**CNN)], teacher_cache="x")
    with pytest.raises(ConfigError, match=r"MEALV2 read the teachers' logits.*disc_input: prob"):
        DistillationModule(terms=[MEALV2()], **kw)
    DistillationModule(terms=[MEALV2(disc_input="prob")], **kw)  # the probabilities are fine
    DistillationModule(terms=[MEALV2(mode="none")], **kw)  # no discriminator
