"""AdaptorHeads (RADIO-style agglomerative distillation): losses by hand, shapes across
families and grids, gradients, balancing, normaliser estimation, a label-free YAML fit."""

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import CNN, MLP, VIT, fit_two_steps

from visdistill import AdaptorHeads, ConfigError, DistillationModule, ModelConfig
from visdistill.cli import main
from visdistill.losses.adaptor import (
    adaptive_balance,
    adaptor_match_loss,
    ema_update,
    fixed_balance,
)
from visdistill.models import ModelOutput
from visdistill.normalizers import PHIS

TINY = dict(name="resnet10t", model_kwargs=dict(channels=(8, 8, 16, 16), stem_width=8))


def _headless(cfg: dict, alias: str | None = None) -> ModelConfig:
    return ModelConfig(**{**cfg, "num_classes": 0}, alias=alias)


def _module(student=CNN, teacher_stage=(-1, -2), **kwargs) -> DistillationModule:
    """Headless teachers: a ViT (4x4 grid of 192-d tokens at stage -1) and a ResNet-10t
    (2x2 map of 256 channels at stage -2)."""
    teachers = [_headless(VIT, "vit"), _headless(CNN, "cnn")]
    term = AdaptorHeads(teacher_stage=list(teacher_stage), **kwargs)
    return DistillationModule(_headless(student), teachers, [term], ce_weight=0.0)


def _outputs(module: DistillationModule, images: torch.Tensor):
    student = module.student(images, stages=module.student_stages, pooled=True)
    teachers = module.teachers(images, stages=module.teacher_stages, pooled=True)
    return student, teachers


def _fit_norms(module: DistillationModule, images: torch.Tensor) -> None:
    term = module.terms[0]
    term.fit_normalizers(term.own(list(module.teachers)), [{"image": images}])


# ------------------------------------------------------------------ pure losses


def test_adaptor_match_loss_by_hand():
    pred = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [3.0, 4.5]])
    cos = torch.tensor([0.0, (9 + 18) / (5 * (9 + 4.5**2) ** 0.5)])
    # SmoothL1, beta 1: |d| < 1 -> 0.5 d^2, else |d| - 0.5; averaged over channels.
    sl1 = torch.tensor([(0.5 + 0.5) / 2, (0 + 0.5 * 0.25) / 2])
    assert torch.allclose(adaptor_match_loss(pred, target), (1 - cos) + sl1)
    # Weights and beta 0.5: |d| >= beta -> |d| - beta / 2.
    sl1_half = torch.tensor([(0.75 + 0.75) / 2, (0 + 0.25) / 2])
    got = adaptor_match_loss(pred, target, cosine_weight=0.3, smooth_l1_weight=0.7, beta=0.5)
    assert torch.allclose(got, 0.3 * (1 - cos) + 0.7 * sl1_half)
    # Tokens: per token, then the mean over tokens.
    tokens = adaptor_match_loss(torch.stack([pred, pred], 1), torch.stack([target, pred], 1))
    assert torch.allclose(tokens, 0.5 * ((1 - cos) + sl1))
    assert torch.equal(adaptor_match_loss(target, target), torch.zeros(2))
    with pytest.raises(ValueError, match="differ"):
        adaptor_match_loss(pred, target[:, :1])


def test_balancing_functions_by_hand():
    losses = torch.tensor([[1.0, 10.0], [3.0, 30.0]])  # batch means 2 and 20
    assert torch.allclose(fixed_balance(losses), torch.tensor([1.0, 10.0]))
    assert torch.allclose(fixed_balance(losses, torch.tensor([3.0, 1.0])), torch.tensor([1.5, 5.0]))
    # Adaptive: each teacher at its running mean contributes 1 / M, whatever its scale.
    assert torch.allclose(
        adaptive_balance(losses, torch.tensor([2.0, 20.0])), torch.full((2,), 0.5)
    )
    running = torch.tensor([4.0, 8.0])
    ready = torch.tensor([True, False])
    new = ema_update(running, torch.tensor([2.0, 20.0]), 0.9, ready)
    assert torch.allclose(new, torch.tensor([0.9 * 4 + 0.1 * 2, 20.0]))


# ------------------------------------------------------------------ the term


@pytest.mark.parametrize("student", [CNN, VIT, MLP], ids=["cnn", "vit", "mlp"])
def test_heads_map_every_student_family_to_each_teachers_own_grid(student):
    module = _module(student)
    term = module.terms[0]
    images = torch.rand(4, 3, 32, 32)
    _fit_norms(module, images)
    s_out, t_outs = _outputs(module, images)
    assert [tuple(t.stages[s].shape) for t, s in zip(t_outs, (-1, -2), strict=True)] == [
        (4, 192, 4, 4),
        (4, 256, 2, 2),
    ]
    assert term.summary_heads[0][-1].out_features == 192  # ViT summary: its class token
    assert term.summary_heads[1][-1].out_features == 512  # ResNet summary: its pooled map
    assert term.spatial_heads[1][-1].out_features == 256
    losses, cosines = term.per_teacher_losses(s_out, t_outs)
    assert losses.shape == (4, 2) and torch.isfinite(losses).all()
    assert set(cosines) == {f"{n}_{k}_cos" for n in ("vit", "cnn") for k in ("summary", "spatial")}
    total, parts, _ = module.compute_losses(
        {"image": images, "target": torch.full((4,), -1), "index": torch.arange(4)}
    )
    assert set(parts) == {"adaptor/vit", "adaptor/cnn"}
    assert torch.allclose(total, parts["adaptor/vit"] + parts["adaptor/cnn"])


@pytest.mark.parametrize("normalize", ["none", "standardize", "phi_s"])
def test_zero_loss_when_the_heads_output_the_normalised_targets(normalize):
    # The student is the teacher (same weights), and each head is replaced by the teacher's
    # normaliser: its output is then exactly the normalised target.
    torch.manual_seed(0)
    teacher = _headless(TINY, "t")
    module = DistillationModule(
        replace(teacher, alias=None),
        [teacher],
        [AdaptorHeads(teacher_stage=-1, normalize=normalize)],
        ce_weight=0.0,
    )
    module.teachers[0].model.load_state_dict(module.student.model.state_dict())
    term = module.terms[0]
    images = torch.rand(6, 3, 32, 32)
    _fit_norms(module, images)
    term.summary_heads[0], term.spatial_heads[0] = term.summary_norms[0], term.spatial_norms[0]
    module.eval()
    s_out, t_outs = _outputs(module, images)
    losses, cosines = term.per_teacher_losses(s_out, t_outs)
    assert losses.abs().max() < 1e-5
    assert all(abs(float(c) - 1) < 1e-5 for c in cosines.values())


def test_gradient_reaches_student_and_heads_never_teachers(tmp_path):
    module = _module(CNN, normalize="phi_s", balance="adaptive")
    # fit_two_steps checks on every step that the teachers get no gradient and do not move.
    trainer, norms = fit_two_steps(module, tmp_path)
    heads = [n for n in norms[0] if "heads" in n]
    assert heads and all(norms[-1][n] is not None and norms[-1][n] > 0 for n in heads)
    term = module.terms[0]
    assert term.normalizers_fitted  # estimated when fit started
    assert all(isinstance(n, PHIS) for n in term.spatial_norms)
    for key in ("train/adaptor/vit", "train/adaptor/vit_spatial_cos", "train/adaptor/cnn"):
        assert torch.isfinite(trainer.callback_metrics[key]), key


def test_student_gradient_without_a_trainer():
    module = _module(VIT)
    images = torch.rand(4, 3, 32, 32)
    _fit_norms(module, images)
    module.train()
    total, _, _ = module.compute_losses(
        {"image": images, "target": torch.full((4,), -1), "index": torch.arange(4)}
    )
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())


def _term_with_losses(balance: str, **kwargs) -> AdaptorHeads:
    module = _module(CNN, balance=balance, **kwargs)
    return module.terms[0]


def test_fixed_balance_uses_normalised_weights_in_training_and_evaluation():
    term = _term_with_losses("fixed", fixed_weights=[3.0, 1.0])
    losses = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    for mode in (True, False):
        term.train(mode)
        assert torch.allclose(term.balanced(losses), torch.tensor([1.5, 5.0]))


def test_drop_balance_keeps_the_worst_teacher_and_every_teacher_in_evaluation():
    term = _term_with_losses("drop", drop_prob=0.999999)
    losses = torch.tensor([[1.0, 10.0], [30.0, 3.0]])
    term.train()
    # Only each image's worst-matched teacher survives; the kept pairs share weight 1/2.
    assert torch.allclose(term.balanced(losses), torch.tensor([15.0, 5.0]))
    term.eval()  # deterministic in evaluation: every teacher, equal weights
    assert torch.allclose(term.balanced(losses), fixed_balance(losses))


def test_adaptive_balance_divides_each_teacher_by_its_running_mean():
    term = _term_with_losses("adaptive", ema_momentum=0.5)
    term.train()
    first = term.balanced(torch.tensor([[1.0, 100.0], [3.0, 300.0]]))
    # First step: the running means are the batch means, so each teacher gives 1 / M.
    assert torch.allclose(first, torch.full((2,), 0.5))
    assert torch.allclose(term.loss_ema, torch.tensor([2.0, 200.0]))
    second = term.balanced(torch.tensor([[4.0, 200.0], [4.0, 200.0]]))
    assert torch.allclose(term.loss_ema, torch.tensor([3.0, 200.0]))
    assert torch.allclose(second, torch.tensor([4 / 6, 0.5]))
    # The divisor carries no gradient.
    losses = torch.tensor([[1.0, 2.0]], requires_grad=True)
    term.balanced(losses).sum().backward()
    assert torch.allclose(losses.grad, 1 / (2 * term.loss_ema))
    term.eval()
    before = term.loss_ema.clone()
    assert torch.allclose(term.balanced(torch.tensor([[1.0, 2.0]])), torch.tensor([0.5, 1.0]))
    assert torch.equal(term.loss_ema, before)  # evaluation leaves the running means alone


def test_normalisers_are_saved_and_not_refitted_on_resume():
    module = _module(CNN)
    images = torch.rand(8, 3, 32, 32)
    _fit_norms(module, images)
    state = module.state_dict()
    keys = [k for k in state if k.startswith("terms.0.") and "norms" in k]
    assert "terms.0.spatial_norms.0.rotation" in keys and "terms.0.summary_norms.1.alpha" in keys
    fresh = _module(CNN)
    assert not fresh.terms[0].normalizers_fitted
    fresh.load_state_dict(state)
    term = fresh.terms[0]
    assert term.normalizers_fitted
    assert torch.equal(term.spatial_norms[0].rotation, module.terms[0].spatial_norms[0].rotation)
    term.on_fit_start(None)  # fitted: returns before touching the (absent) trainer


def test_clear_errors():
    with pytest.raises(ConfigError, match="normalize must be one of none, standardize, phi_s"):
        AdaptorHeads(normalize="pca")
    with pytest.raises(ConfigError, match="balance must be one of fixed, drop, adaptive"):
        AdaptorHeads(balance="adaloss")
    with pytest.raises(ConfigError, match="fixed_weights lists 1 weights for 2 teachers"):
        _module(CNN, fixed_weights=[1.0])
    with pytest.raises(ConfigError, match="teacher_stage lists 3 stages for 2 teachers"):
        _module(CNN, teacher_stage=(-1, -1, -1))
    module = _module(CNN)
    s_out, t_outs = _outputs(module, torch.rand(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="normalisers have no statistics"):
        module.terms[0].per_teacher_losses(s_out, t_outs)
    with pytest.raises(ConfigError, match="reads the student's pooled features"):
        _fit_norms(module, torch.rand(4, 3, 32, 32))
        module.terms[0].per_teacher_losses(ModelOutput(logits=None), t_outs)


def test_label_free_fit_from_yaml_with_headless_teachers(tmp_path):
    vit = {"name": "vit_tiny_patch16_224", "num_classes": 0, "pretrained": False}
    config = {
        "seed_everything": 0,
        "model": {
            "student": {**TINY, "num_classes": 0},
            "teachers": [
                {**vit, "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}},
                {"name": "resnet10t", "num_classes": 0, "pretrained": False, "alias": "cnn"},
            ],
            "terms": [
                {
                    "class_path": "visdistill.AdaptorHeads",
                    "init_args": {
                        "teacher_stage": [-1, -2],
                        "normalize": "phi_s",
                        "balance": "adaptive",
                        "fit_samples": 64,
                    },
                }
            ],
            "ce_weight": 0.0,
        },
        "data": {
            "class_path": "visdistill.DigitsDataModule",
            "init_args": {"batch_size": 16, "labels": False},
        },
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 3,
            "limit_val_batches": 1,
            "accelerator": "cpu",
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "agg", "version": ""},
            },
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    main(["fit", "--config", str(path)])
    ckpt = torch.load(
        tmp_path / "runs" / "agg" / "checkpoints" / "last.ckpt",
        weights_only=True,
        map_location="cpu",
    )
    state = ckpt["state_dict"]
    assert bool(state["terms.0.spatial_norms.0.fitted"])
    alpha = float(state["terms.0.spatial_norms.1.alpha"])
    assert math.isfinite(alpha) and alpha > 0
    assert ckpt["global_step"] == 3
    assert state["terms.0.loss_ema_ready"].all() and (state["terms.0.loss_ema"] > 0).all()
