import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CNN, VIT

from visdistill import KD, MEALV2, UNIC, ConfigError, DistillationModule, ModelConfig, MSTRouting
from visdistill.losses import (
    load_balancing_loss,
    soft_cross_entropy,
    teacher_drop_coefficients,
    topk_weights,
)
from visdistill.models import ModelOutput
from visdistill.terms.meal_v2 import OutputDiscriminator
from visdistill.terms.mst import mst_loss_weights
from visdistill.terms.unic import RunningStandardizer, ema_weight

TEACHERS = [ModelConfig(**CNN), ModelConfig(**VIT)]


def _batch(n=6):
    return {"image": torch.rand(n, 3, 32, 32), "target": torch.arange(n) % 10}


# ---------------------------------------------------------------------------- MEAL V2
def test_meal_v2_loss_is_soft_ce_against_the_mean_probabilities():
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    t2 = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    target = (t1.softmax(-1) + t2.softmax(-1)) / 2
    by_hand = -(target * zs.log_softmax(-1)).sum(-1).mean()
    term = MEALV2(mode="none")
    out = term(ModelOutput(zs), [ModelOutput(t1), ModelOutput(t2)], torch.tensor([0, 1]))
    assert torch.allclose(out.losses["soft_ce"], by_hand) and set(out.losses) == {"soft_ce"}
    assert torch.allclose(by_hand, soft_cross_entropy(zs, target))


def test_discriminator_widths_follow_the_official_rule_with_a_small_class_guard():
    official = OutputDiscriminator(1000)
    assert official.widths == [1000, 125, 15, 2]
    assert sum(p.numel() for p in official.parameters()) == 127_047
    assert isinstance(official[-1], torch.nn.ReLU)  # the official final ReLU
    assert OutputDiscriminator(10).widths == [10, 4, 4, 2]
    assert not isinstance(OutputDiscriminator(10, final_relu=False)[-1], torch.nn.ReLU)


def _disc_grad(mode):
    torch.manual_seed(0)
    term = MEALV2(mode=mode, final_relu=False)
    term.discriminator = OutputDiscriminator(64, final_relu=False)
    zs = torch.randn(8, 64, requires_grad=True)
    teachers = [ModelOutput(torch.randn(8, 64)), ModelOutput(torch.randn(8, 64))]
    term(ModelOutput(zs), teachers, torch.zeros(8, dtype=torch.long)).losses["disc"].backward()
    return zs.grad, [p.grad.clone() for p in term.discriminator.parameters()]


def test_grl_flips_the_discriminator_gradient_on_the_student_only():
    joint_student, joint_disc = _disc_grad("joint")
    grl_student, grl_disc = _disc_grad("grl")
    assert joint_student.abs().sum() > 0
    assert torch.allclose(grl_student, -joint_student)
    assert all(torch.allclose(a, b) for a, b in zip(joint_disc, grl_disc, strict=True))


def test_meal_v2_in_a_module_trains_student_and_discriminator_not_teachers():
    module = DistillationModule(ModelConfig(**CNN), TEACHERS, [MEALV2(mode="grl")])
    loss, parts, _ = module.compute_losses(_batch())
    loss.backward()
    assert {"meal_v2/soft_ce", "meal_v2/disc"} <= set(parts)
    assert all(p.grad is not None for p in module.terms[0].discriminator.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())
    with pytest.raises(ConfigError, match="mode must be one of"):
        MEALV2(mode="adversarial")


# ---------------------------------------------------------------------------- UNIC
def test_teacher_dropping_keeps_the_worst_teacher_and_drops_others_at_rate_p():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(20000, 3, generator=g)
    coeff = teacher_drop_coefficients(losses, p=0.3, generator=g)
    keep = coeff > 0
    worst = losses.argmax(-1)
    assert keep[torch.arange(len(worst)), worst].all()  # never dropped
    others = ~torch.nn.functional.one_hot(worst, 3).bool()
    rate = 1 - keep[others].float().mean()
    assert abs(rate - 0.3) < 0.01  # 40k Bernoulli draws: std 0.0023
    assert torch.isclose(coeff.sum(), torch.tensor(1.0))  # global normalisation
    per_image = teacher_drop_coefficients(losses[:4], 0.5, "per_image", generator=g)
    assert torch.allclose(per_image.sum(-1), torch.full((4,), 0.25))


def test_running_stats_anneal_and_standardise_with_the_previous_statistics():
    assert ema_weight(0.0) == pytest.approx(1.0) and ema_weight(1.0) == pytest.approx(0.001)
    std = RunningStandardizer(2)
    y = torch.tensor([[1.0, 10.0], [3.0, 14.0]])
    out = std(y, alpha=1.0, update=True)
    assert torch.equal(out, (y - 0) / (1 + 1e-6))  # first step: buffers still 0 / 1
    assert torch.allclose(std.mean, torch.tensor([2.0, 12.0]))
    assert torch.allclose(std.std, torch.tensor([2**0.5, 8**0.5]) + 1e-6)


def _ddp_stats(rank, world, port, data, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    std = RunningStandardizer(4)
    std(data[rank::world], alpha=0.5, update=True)
    out[rank] = (std.mean.clone(), std.std.clone())
    dist.destroy_process_group()


def test_unic_running_statistics_are_all_reduced_under_ddp():
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    single = RunningStandardizer(4)
    single(data, alpha=0.5, update=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_stats, args=(2, port, data, out), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.allclose(out[rank][0], single.mean, atol=1e-6)
        assert torch.allclose(out[rank][1], single.std, atol=1e-6)


def test_unic_across_families_and_its_weights_reach_kd():
    module = DistillationModule(ModelConfig(**VIT), TEACHERS, [UNIC(drop_prob=0.5), KD()])
    term = module.terms[0]
    batch = _batch()
    student = module.student(batch["image"], stages=module.student_stages, pooled=True)
    teachers = module.teachers(batch["image"], stages=module.teacher_stages, pooled=True)
    with pytest.raises(ConfigError, match="run the student with prefix_tokens=True"):
        term(student, teachers, batch["target"])  # ViT: reads class tokens
    student = module.student(
        batch["image"], stages=module.student_stages, pooled=True, prefix_tokens=True
    )
    weights = term(student, teachers, batch["target"]).teacher_weights
    assert weights.shape == (6, 2) and torch.allclose(weights.sum(-1), torch.ones(6))
    loss, parts, _ = module.compute_losses(batch)
    loss.backward()
    assert {"unic", "kd"} <= set(parts) and torch.isfinite(loss)
    assert all(p.grad is not None for p in term.cls_ladders.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())
    assert not torch.equal(term.cls_stats[0].mean, torch.zeros_like(term.cls_stats[0].mean))


# ---------------------------------------------------------------------------- MST
def test_router_weights_sum_to_one_and_topk_keeps_exactly_k():
    gates = torch.randn(7, 5).softmax(-1)
    for k in (1, 2, 3):
        w = topk_weights(gates, k)
        assert ((w > 0).sum(-1) == k).all() and torch.allclose(w.sum(-1), torch.ones(7))
        assert torch.equal((w > 0), torch.zeros_like(w, dtype=torch.bool).scatter(
            -1, gates.topk(k, -1).indices, True))  # fmt: skip


def test_load_balancing_is_zero_at_uniform_use_and_positive_otherwise():
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, "kl").abs() < 1e-7
    assert load_balancing_loss(uniform, "cv").abs() < 1e-7
    # Balanced on average though every sample is one-hot: still 0 (it is a usage loss).
    assert load_balancing_loss(torch.eye(4).repeat(2, 1), "kl").abs() < 1e-7
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    assert load_balancing_loss(skewed, "kl") > 0 and load_balancing_loss(skewed, "cv") > 0


def test_mst_schedule_matches_the_reference():
    assert mst_loss_weights(0) == (1.0, 1.0)
    assert mst_loss_weights(1) == (0.5, pytest.approx(0.9))
    assert mst_loss_weights(11) == (0.5, pytest.approx(0.81))
    assert mst_loss_weights(31) == (0.25, pytest.approx(0.9**4))


@pytest.mark.parametrize("mode", ["mst", "soft_mixture", "utility"])
@pytest.mark.parametrize("router_input", ["student_logits", "student_embedding", "teacher_stats"])
def test_mst_routing_terms_train_the_router(mode, router_input):
    term = MSTRouting(top_k=1, mode=mode, router_input=router_input)
    module = DistillationModule(ModelConfig(**CNN), TEACHERS, [term, KD()])
    loss, parts, _ = module.compute_losses(_batch())
    loss.backward()
    assert {"mst/kd", "mst/balance"} <= set(parts) and torch.isfinite(loss)
    assert all(p.grad is not None for p in term.router.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())


def test_mst_config_errors():
    with pytest.raises(ConfigError, match="top_k=3 must be between 1 and the 2 teachers"):
        DistillationModule(ModelConfig(**CNN), TEACHERS, [MSTRouting(top_k=3)])
    with pytest.raises(ConfigError, match="router_input must be one of"):
        MSTRouting(router_input="labels")
    with pytest.raises(ConfigError, match="each provide per-sample teacher weights"):
        DistillationModule(ModelConfig(**CNN), TEACHERS, [MSTRouting(), UNIC()])


def test_teacher_weighted_mean_by_hand():
    from visdistill.losses import teacher_weighted_mean

    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0])
    # Uniform: mean over both samples of (1 + 3) / 2 and (4 + 0) / 2 -> (2 + 2) / 2 = 2.
    assert teacher_weighted_mean([a, b], None).item() == 2.0
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    # Sample 0 listens to teacher a only (1), sample 1 gives 0.25 * 4 + 0.75 * 0 = 1.
    assert teacher_weighted_mean([a, b], w).item() == 1.0
    a.requires_grad_(True)
    teacher_weighted_mean([a, b], w).backward()
    assert torch.equal(a.grad, torch.tensor([0.5, 0.125]))  # w[:, 0] / B
