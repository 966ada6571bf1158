import json

import lightning as L
import pytest
import timm
import torch
from conftest import CNN, VIT

from visdistill import (
    KD,
    ConfigError,
    DigitsDataModule,
    DistillationModule,
    ModelConfig,
    export_student,
)


def _trainer(tmp_path, epochs=1, **kw):
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


class _MemoryFormats(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.during = {
            p.is_contiguous(memory_format=torch.channels_last)
            for p in module.parameters()
            if p.ndim == 4 and p.shape[-1] > 1  # a 1x1 kernel is contiguous in both formats
        }


def test_teacher_class_count_mismatch_is_caught_at_construction():
    with pytest.raises(
        ConfigError, match="teachers predict 5 classes but the student resnet10t predicts 10"
    ):
        DistillationModule(
            student=ModelConfig(**CNN), teachers=[ModelConfig(name="resnet10t", num_classes=5)]
        )


def test_terms_without_teachers_are_refused():
    with pytest.raises(ConfigError, match="KD.*need teachers"):
        DistillationModule(student=ModelConfig(**CNN), terms=[KD()])


def test_data_student_class_mismatch(tmp_path):
    module = DistillationModule(student=ModelConfig(name="resnet10t", num_classes=7))
    with pytest.raises(ConfigError, match="the data has 10 classes"):
        _trainer(tmp_path, limit_train_batches=1).fit(module, DigitsDataModule(batch_size=32))


def test_kd_fit_learns_digits_and_leaves_teachers_untouched(tmp_path):
    torch.manual_seed(0)
    teacher_cfg = ModelConfig(**VIT)
    # A half-width resnet10t student: the same fit in 13 s instead of 32 s (1 thread).
    student = dict(CNN, model_kwargs=dict(channels=(16, 32, 64, 128), stem_width=16))
    module = DistillationModule(
        student=ModelConfig(**student),
        teachers=[teacher_cfg, ModelConfig(name="convnext_atto", num_classes=10)],
        terms=[KD(temperature=4.0, weight=0.5)],
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    before = {k: v.clone() for k, v in module.teachers.state_dict().items()}
    data = DigitsDataModule(batch_size=64, seed=0)
    formats = _MemoryFormats()
    trainer = _trainer(tmp_path, epochs=4, callbacks=[formats])
    trainer.fit(module, data)
    # channels_last (the default) on CPU while fitting; the default format once done, so the
    # trained model computes what its checkpoint and export compute.
    assert formats.during == {True}
    assert all(p.is_contiguous() for p in module.parameters())
    # Teachers: bit-identical weights and buffers (BatchNorm stats too), no gradients.
    for k, v in module.teachers.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in module.teachers.parameters())
    assert "train/kd" in trainer.logged_metrics and "val/ensemble_acc" in trainer.logged_metrics
    result = trainer.test(module, data, verbose=False)[0]
    # 4 epochs on 1.4k digits: 0.88-0.93 for seeds 0-2 (measured 2026-12-06), chance is 0.1.
    assert result["test/acc"] > 0.6
    # Per-teacher metrics are keyed by the teachers' (short) names.
    assert module.teacher_names == ["vit_tiny_patch16_224", "convnext_atto"]
    assert {
        "test/vit_tiny_patch16_224_acc",
        "test/convnext_atto_acc",
        "test/ensemble_acc",
    } <= set(result)


def test_baseline_fit_and_export_loads_in_plain_timm(tmp_path):
    module = DistillationModule(student=ModelConfig(**CNN))
    trainer = _trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    data = DigitsDataModule(batch_size=32)
    trainer.fit(module, data)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_student(ckpt, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").stat().st_mode & 0o044  # readable by others, not 0600
    assert config["architecture"] == "resnet10t" and config["pretrained_cfg"]["input_size"] == [
        3,
        32,
        32,
    ]
    x = torch.rand(3, 3, 32, 32)
    module.eval()
    expected = module(x)
    normalised = module.student.preprocess(x)
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    by_overlay = timm.create_model(
        "resnet10t",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10),
    ).eval()
    with torch.no_grad():
        assert torch.allclose(by_dir(normalised), expected, atol=1e-5)
        assert torch.allclose(by_overlay(normalised), expected, atol=1e-5)
