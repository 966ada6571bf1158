"""MST routing term: load balancing and utility by hand, router weights for every mode, which
loss trains what, the SE-style feature gates, a real fit. (More in test_multi_teacher.py:
top-k keeps exactly k, balancing is 0 at uniform use, the schedule, every mode x input.)"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import CNN, VIT, fit_two_steps

from visdistill import KD, ConfigError, DistillationModule, ModelConfig
from visdistill.losses import fold_expert_weights, kd_loss, load_balancing_loss
from visdistill.models import ModelOutput
from visdistill.terms.mst import FeatureGate, MSTRouting, expert_descriptors

TEACHERS = [ModelConfig(**CNN), ModelConfig(**VIT)]


def test_load_balancing_by_hand():
    gates = torch.tensor([[0.75, 0.25]] * 4)
    kl = (0.5 * (math.log(0.5) - math.log(0.75)) + 0.5 * (math.log(0.5) - math.log(0.25))) / 2
    assert load_balancing_loss(gates, "kl").item() == pytest.approx(kl)
    # Importance (3, 1): unbiased std sqrt(2) over mean 2.
    assert load_balancing_loss(gates, "cv").item() == pytest.approx(2**0.5 / 2)
    with pytest.raises(ValueError, match="'kl' or 'cv'"):
        load_balancing_loss(gates, "l2")


def test_fold_expert_weights_sums_each_teachers_variants():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # experts: t0, t1, t0 gated, t1 gated
    assert torch.allclose(fold_expert_weights(w, 2), torch.tensor([[0.4, 0.6]]))


def _module(**kw):
    torch.manual_seed(0)
    return DistillationModule(ModelConfig(**CNN), TEACHERS, [MSTRouting(**kw), KD()])


def _outputs(module, n=6):
    x = torch.rand(n, 3, 32, 32)
    student = module.student(x, pooled=module.needs_pooled)
    return student, module.teachers(x, pooled=module.needs_pooled)


@pytest.mark.parametrize("mode", ["mst", "soft_mixture", "utility"])
@pytest.mark.parametrize("gates", [False, True])
def test_router_weights_sum_to_one_with_exactly_k_experts(mode, gates):
    module = _module(top_k=2, mode=mode, feature_gates=gates)
    term = module.terms[0]
    student, teachers = _outputs(module)
    w = term(student, teachers, torch.arange(6) % 10).teacher_weights
    g = term.gates(student, term.experts(teachers)[0])
    assert g.shape == (6, 4 if gates else 2) and torch.allclose(g.sum(-1), torch.ones(6))
    assert w.shape == (6, 2) and torch.allclose(w.sum(-1), torch.ones(6))
    if mode == "soft_mixture":
        expected = g.detach()
    else:
        expected = torch.zeros_like(g).scatter(-1, g.topk(2, -1).indices, 0.5)
        assert ((expected > 0).sum(-1) == 2).all()
    assert torch.allclose(w, fold_expert_weights(expected, 2) if gates else expected)


def _grads(term, student, teachers, key, target):
    out = term(student, teachers, target).losses
    params = list(term.parameters())
    return torch.autograd.grad(
        out[key], [student.logits, *params], allow_unused=True, retain_graph=True
    )


def _leaf_student(module):
    student, teachers = _outputs(module)
    logits = student.logits.detach().requires_grad_(True)
    return ModelOutput(logits, pooled=student.pooled), teachers


def test_mst_mode_trains_the_router_only_through_load_balancing():
    module = _module(mode="mst")
    term = module.terms[0]
    student, teachers = _leaf_student(module)
    target = torch.arange(6) % 10
    grad_student, *grad_router = _grads(term, student, teachers, "kd", target)
    assert grad_student is not None and all(g is None for g in grad_router)
    grad_student, *grad_router = _grads(term, student, teachers, "balance", target)
    assert all(g is not None for g in grad_router)
    assert grad_student is not None and grad_student.abs().sum() > 0  # reaches the student
    detached = _module(mode="mst", detach_router_input=True).terms[0]
    assert _grads(detached, student, teachers, "balance", target)[0] is None


def test_soft_mixture_trains_the_router_through_kd():
    module = _module(mode="soft_mixture")
    term = module.terms[0]
    student, teachers = _leaf_student(module)
    _, *grad_router = _grads(term, student, teachers, "kd", torch.zeros(6, dtype=torch.long))
    assert all(g is not None and g.abs().sum() > 0 for g in grad_router)


def test_utility_target_by_hand():
    term = MSTRouting(mode="utility", utility_temperature=0.5, schedule=False)
    term.setup(SimpleNamespace(num_classes=3, num_features=8), [None, None])
    z1 = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # right, then unsure
    z2 = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 5.0]])  # wrong, then right and sure
    y = torch.tensor([0, 2])
    zs = torch.zeros(2, 3)
    out = term(ModelOutput(zs), [ModelOutput(z1), ModelOutput(z2)], y).losses
    g = term.router(zs).softmax(-1)
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in (z1, z2)], 1)
    r = (-ce / 0.5).softmax(-1)
    assert torch.allclose(out["utility"], -(r * g.log()).sum(-1).mean())
    assert (r.argmax(-1) == torch.tensor([0, 1])).all()
    # Hard top-1: the student distils from the router's pick, T^2 KL at T = 4.
    pick = g.argmax(-1)
    probs = torch.stack([(z / 4).softmax(-1) for z in (z1, z2)], 1)[torch.arange(2), pick]
    assert torch.allclose(out["kd"], kd_loss(zs, probs, 4.0))


def test_schedule_follows_the_epoch():
    module = _module(mode="mst")
    term = module.terms[0]
    student, teachers = _outputs(module)
    term.epoch = 0.3
    first = term(student, teachers, None).losses
    term.epoch = 11.5  # epochs 11-20: w_kl 0.5, w_lb 0.81
    later = term(student, teachers, None).losses
    assert torch.allclose(later["kd"], 0.5 * first["kd"])
    assert torch.allclose(later["balance"], 0.81 * first["balance"])


def test_expert_descriptors_by_hand():
    z = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]]).transpose(0, 1)  # (B=1, E=2, K=2)
    d = expert_descriptors(z, torch.zeros(1, 2)).view(2, 5)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    kl_mean = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)  # mean p (0.625, 0.375)
    assert torch.allclose(d[0], torch.tensor([0.5, math.log(2), 0.0, kl_mean, 0.0]))
    assert torch.allclose(d[1, :3], torch.tensor([0.75, h, 0.5]))
    assert torch.allclose(d[1, 4], torch.tensor(0.75 * math.log(1.5) + 0.25 * math.log(0.5)))


def test_feature_gates_start_near_the_teacher_and_train_only_the_gates():
    module = _module(mode="utility", feature_gates=True)
    term = module.terms[0]
    assert isinstance(term.gate_nets[0], FeatureGate) and len(term.gate_nets) == 2
    assert term.router[-1].out_features == 4
    student, teachers = _leaf_student(module)
    experts, gated = term.experts(teachers)
    for m, out in enumerate(teachers):
        head = term._heads[m]
        mask = torch.sigmoid(torch.tensor(3.0))
        assert torch.allclose(gated[:, m], head(mask * out.pooled), atol=1e-5)
        assert torch.equal(experts[:, m], out.logits)
    target = torch.arange(6) % 10
    grad_student, *grad_params = _grads(term, student, teachers, "gate", target)
    named = [n for n, _ in term.named_parameters()]
    assert grad_student is None  # the student is the gates' target, read without gradient
    for name, grad in zip(named, grad_params, strict=True):
        assert (grad is not None) == name.startswith("gate_nets"), name
    # Gate loss by hand: pull toward the student + label CE of the gated teachers.
    t = 4.0
    s = (student.logits.detach() / t).softmax(-1)
    pull = torch.stack([kd_loss(gated[:, m], s, t) for m in range(2)]).mean()
    ce = torch.stack([F.cross_entropy(gated[:, m], target) for m in range(2)]).mean()
    out = term(student, teachers, target)
    assert torch.allclose(out.losses["gate"], pull + ce, atol=1e-5)
    assert {"router_entropy", "route_frac/expert3"} <= set(out.metrics)


def test_no_nan_at_logits_1e4():
    term = MSTRouting(mode="utility", router_input="teacher_stats", top_k=2)
    term.setup(SimpleNamespace(num_classes=3, num_features=8), [None, None])
    zs = torch.tensor([[1e4, -1e4, 0.0]] * 2, requires_grad=True)
    teachers = [ModelOutput(torch.tensor([[-1e4, 1e4, 0.0]] * 2)), ModelOutput(torch.zeros(2, 3))]
    out = term(ModelOutput(zs), teachers, torch.tensor([0, 1]))
    total = sum(out.losses.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(zs.grad).all()


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match=r"mode must be one of \('mst', 'soft_mixture', 'utili"):
        MSTRouting(mode="hard")
    with pytest.raises(ConfigError, match=r"balance must be one of \('kl', 'cv'\)"):
        MSTRouting(balance="switch")
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        MSTRouting(top_k=0)
    with pytest.raises(ConfigError, match="temperatures must be > 0"):
        MSTRouting(temperature=0)
    with pytest.raises(ConfigError, match=r"top_k=5 must be between 1 and the 4 experts"):
        _module(top_k=5, feature_gates=True)
    _module(top_k=4, feature_gates=True)  # 2 teachers + 2 gated variants
    bad_head = SimpleNamespace(
        name="odd",
        num_features=8,
        model=SimpleNamespace(get_classifier=lambda: torch.nn.Identity()),
    )
    with pytest.raises(ConfigError, match="odd's classifier is Identity"):
        MSTRouting(feature_gates=True).setup(
            SimpleNamespace(num_classes=3, num_features=8), [bad_head]
        )


def test_mst_with_gates_fits_with_a_lightning_trainer(tmp_path):
    term = MSTRouting(mode="utility", router_input="teacher_stats", feature_gates=True)
    module = DistillationModule(ModelConfig(**CNN), TEACHERS, [term])
    trainer, steps = fit_two_steps(module, tmp_path)
    assert len(steps) == 2 and all(None not in norms.values() for norms in steps)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    metrics = trainer.callback_metrics
    assert {"train/mst/gate", "train/mst/utility"} <= set(metrics)
    # Diagnostics are logged beside the losses, not added to them.
    fracs = [v for k, v in metrics.items() if k.startswith("train/mst/route_frac/")]
    assert len(fracs) == term.n_experts and abs(float(sum(fracs)) - 1.0) < 1e-5
    assert 0.0 <= float(metrics["train/mst/router_entropy"]) <= float(torch.log(torch.tensor(4.0)))
    assert "gate_nets.0.fc1.weight" in term.state_dict()
    assert not any(k.startswith("_heads") for k in term.state_dict())
