import pytest
import torch
import torch.nn.functional as F
from conftest import CNN, VIT

from visdistill import ConfigError, ModelConfig, Teacher, TeacherEnsemble


def test_teacher_is_frozen_and_stays_in_eval(batch):
    teacher = Teacher(**CNN)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    out = teacher(batch, stages=(2,), pooled=True)
    assert not out.logits.requires_grad and not out.stages[2].requires_grad
    assert not out.logits.is_inference()  # no_grad, not inference_mode: usable in autograd graphs


def test_vit_teacher_receives_exactly_its_own_preprocessing():
    """A ViT teacher at 48 px with (0.5, 0.5) statistics and a CNN at 32 px with
    ImageNet statistics take the same canonical batch; each sees its own input."""
    vit = ModelConfig(
        name="vit_tiny_patch16_224",
        num_classes=10,
        input_size=48,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        model_kwargs=dict(img_size=48, patch_size=8, depth=1),
    )
    cnn = ModelConfig(name="resnet10t", num_classes=10)
    ensemble = TeacherEnsemble([vit, cnn])
    seen = {}
    first_layers = [ensemble[0].model.patch_embed, ensemble[1].model.conv1]
    for i, layer in enumerate(first_layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].clone()))
    x = torch.rand(4, 3, 32, 32)
    ensemble(x)
    up = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False)
    assert torch.equal(seen[0], (up - 0.5) / 0.5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[1], (x - mean) / std, atol=1e-6)


def test_identical_specs_share_one_preprocessing(monkeypatch, batch):
    ensemble = TeacherEnsemble(
        [ModelConfig(**CNN), ModelConfig(name="convnext_atto", num_classes=10)]
    )
    calls = []
    for t in ensemble:
        original = t.preprocess
        monkeypatch.setattr(t, "preprocess", lambda x, f=original: calls.append(1) or f(x))
    ensemble(batch)
    assert len(calls) == 1


def test_ensemble_stays_in_eval():
    ensemble = TeacherEnsemble([ModelConfig(**CNN)])
    ensemble.train()
    assert not ensemble.training and not any(m.training for m in ensemble.modules())


def test_per_teacher_stage_lists(batch):
    ensemble = TeacherEnsemble([ModelConfig(**CNN), ModelConfig(**VIT)])
    outs = ensemble(batch, stages=[(4,), (1,)])
    assert outs[0].stages[4].shape == (2, 512, 1, 1)
    assert outs[1].stages[1].shape == (2, 192, 4, 4)
    with pytest.raises(ConfigError, match="3 teachers, but there are 2"):
        ensemble(batch, stages=[(1,), (1,), (1,)])


def test_teachers_must_agree_on_classes():
    with pytest.raises(ConfigError, match="resnet10t: 10, convnext_atto: 5"):
        TeacherEnsemble([ModelConfig(**CNN), ModelConfig(name="convnext_atto", num_classes=5)])
