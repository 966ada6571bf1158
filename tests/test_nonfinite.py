import lightning as L
import pytest
import torch
from conftest import CNN

from visdistill import (
    ConfigError,
    DigitsDataModule,
    DistillationModule,
    DistillTerm,
    ModelConfig,
    NonFiniteLossError,
)


class Poison(DistillTerm):
    """Returns NaN on the given call (0-based), 0 otherwise."""

    name = "poison"

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, student, teachers, target, teacher_weights=None):
        value = student.logits.sum() * 0.0
        if self.calls == self.at:
            value = value + float("nan")
        self.calls += 1
        return {"poison": value}


class Snapshot(L.Callback):
    """Student weights before and after training batch 1."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            self.before = [p.detach().clone() for p in module.student.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self.after = [p.detach().clone() for p in module.student.parameters()]


def _fit(module, tmp_path, batches=4, callbacks=()):
    trainer = L.Trainer(
        callbacks=list(callbacks),
        max_epochs=1, limit_train_batches=batches, limit_val_batches=0, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return trainer


def _module(**kw):
    return DistillationModule(
        student=ModelConfig(**CNN), teachers=[ModelConfig(**CNN)], terms=[Poison(at=1)], **kw
    )


def test_skip_mode_skips_the_step_warns_naming_the_term_and_counts(tmp_path):
    module, snap = _module(), Snapshot()
    with pytest.warns(RuntimeWarning, match=r"non-finite loss in poison at epoch 0, batch 1"):
        _fit(module, tmp_path, callbacks=[snap])
    assert all(torch.equal(a, b) for a, b in zip(snap.before, snap.after, strict=True))
    assert int(module.nonfinite_steps) == 1
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_raise_mode_stops_with_the_term_and_position(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"poison at epoch 0, batch 1, global step 1"):
        _fit(_module(nonfinite="raise"), tmp_path)


def test_nan_pixels_are_caught_by_the_guard():
    module = DistillationModule(student=ModelConfig(**CNN), nonfinite="raise")
    images = torch.rand(4, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    total, parts, _ = module.compute_losses({"image": images, "target": torch.arange(4)})
    assert module._loss_is_nonfinite(total)
    with pytest.raises(NonFiniteLossError, match="non-finite loss in ce .*NaN/inf pixels"):
        module._handle_nonfinite(parts, 0)


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="nonfinite must be one of"):
        DistillationModule(student=ModelConfig(**CNN), nonfinite="warn")
