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
    assert module.nonfinite_guard.loss_is_nonfinite(module, total)
    with pytest.raises(NonFiniteLossError, match="non-finite loss in ce .*NaN/inf pixels"):
        module.nonfinite_guard.handle(module, parts, 0)


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="nonfinite must be one of"):
        DistillationModule(student=ModelConfig(**CNN), nonfinite="warn")


class NaNPixel(L.Callback):
    """Puts one NaN pixel into image 0 of the given training batches and records the
    student's BatchNorm statistics, the terms' buffers, the RNG and the lr around them."""

    def __init__(self, at=(1,)) -> None:
        self.at, self.before, self.after = set(at), {}, {}

    def _state(self, module, trainer):
        return {
            "buffers": {k: v.clone() for k, v in module.student.named_buffers()},
            "terms": {k: v.clone() for k, v in module.terms.named_buffers()},
            "rng": torch.get_rng_state(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "opt": {k: v.clone() for k, v in _optimizer_tensors(trainer.optimizers[0]).items()},
        }

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx in self.at:
            batch["image"][0, 0, 0, 0] = float("nan")
            self.before[batch_idx] = self._state(module, trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx in self.at:
            self.after[batch_idx] = self._state(module, trainer)


def _optimizer_tensors(optimizer):
    return {
        f"{i}/{k}": v
        for i, state in enumerate(optimizer.state.values())
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


class Counter(DistillTerm):
    """A term with a running buffer updated in forward (like UNIC's statistics)."""

    name = "counter"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.zeros(3))

    def forward(self, student, teachers, target, teacher_weights=None):
        with torch.no_grad():
            self.running.add_(student.logits.detach().float().mean())
        return {"counter": student.logits.sum() * 0.0}


def _fit_sched(module, tmp_path, callbacks, batches=4, **trainer_kw):
    trainer = L.Trainer(
        callbacks=list(callbacks), max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, **trainer_kw,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=16))
    return trainer


def test_a_nan_pixel_leaves_batchnorm_statistics_rng_optimizer_and_scheduler_untouched(tmp_path):
    # Before the fix the forward pass of the skipped step wrote NaN into running_var.
    cnn = dict(CNN, model_kwargs=dict(drop_rate=0.5))  # dropout: the forward draws random numbers
    module = DistillationModule(
        student=ModelConfig(**cnn),
        teachers=[ModelConfig(**CNN)],
        terms=[Counter()],
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)),
        scheduler_interval="step",
    )
    probe = NaNPixel(at=(1,))
    with pytest.warns(RuntimeWarning, match="non-finite loss in ce"):
        _fit_sched(module, tmp_path, [probe])
    before, after = probe.before[1], probe.after[1]
    bn = [k for k in before["buffers"] if k.endswith("running_var")]
    assert bn, "the student must have BatchNorm layers"
    for key, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][key]), key
    assert torch.equal(before["terms"]["0.running"], after["terms"]["0.running"])
    assert torch.equal(before["rng"], after["rng"])
    assert before["lr"] == after["lr"]  # the step-interval scheduler did not step
    assert before["opt"].keys() == after["opt"].keys()
    assert all(torch.equal(v, after["opt"][k]) for k, v in before["opt"].items())
    assert all(torch.isfinite(b).all() for b in module.student.buffers())
    assert int(module.nonfinite_steps) == 1
    # The steps around it ran normally: the buffers moved, the scheduler stepped 3 times.
    assert module.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_a_run_that_skips_every_step_stops_with_an_error(tmp_path):
    module = DistillationModule(student=ModelConfig(**CNN), nonfinite_max_consecutive=3)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(NonFiniteLossError, match=r"3 training steps in a row .*consecutive: 3"),
    ):
        _fit_sched(module, tmp_path, [NaNPixel(at=range(10))], batches=10)
    assert int(module.nonfinite_steps) == 3


def test_too_large_a_fraction_of_skipped_steps_stops_with_an_error(tmp_path):
    # Every other step is skipped: never 2 in a row, but 10 of 20 > 0.4.
    module = DistillationModule(student=ModelConfig(**CNN), nonfinite_max_fraction=0.4)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(NonFiniteLossError, match=r"10 of 20 training steps .*fraction: 0.4"),
    ):
        _fit_sched(module, tmp_path, [NaNPixel(at=range(1, 40, 2))], batches=40)


def test_the_end_of_a_run_that_skipped_steps_reports_the_count(tmp_path):
    module = DistillationModule(student=ModelConfig(**CNN))
    with pytest.warns(RuntimeWarning, match=r"1 of 4 training steps of this run were skipped"):
        _fit_sched(module, tmp_path, [NaNPixel(at=(2,))])


@pytest.mark.parametrize(
    "kw", [dict(nonfinite_max_consecutive=0), dict(nonfinite_max_fraction=1.5)]
)
def test_bad_skip_limits_are_config_errors(kw):
    with pytest.raises(ConfigError, match="nonfinite_max"):
        DistillationModule(student=ModelConfig(**CNN), **kw)
