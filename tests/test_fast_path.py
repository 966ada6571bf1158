import torch
from conftest import CNN
from test_nonfinite import _fit

from visdistill import DistillationModule, ModelConfig


def test_compile_and_bf16_teachers_keep_checkpoint_keys(tmp_path):
    from visdistill import KD

    module = DistillationModule(
        student=ModelConfig(**CNN),
        teachers=[ModelConfig(**CNN)],
        terms=[KD()],
        teacher_precision="bf16",
        compile={"backend": "eager"},
    )
    keys = set(module.state_dict())
    _fit(module, tmp_path, batches=2)
    assert set(module.state_dict()) == keys  # no `_orig_mod.` prefixes
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.arange(4)}
    with module.live_teachers.autocast(batch["image"]):
        assert module.teachers(batch["image"])[0].logits.dtype == torch.bfloat16
    total, parts, _ = module.compute_losses(batch)
    assert torch.isfinite(total) and parts["kd"].dtype == torch.float32


def test_loss_components_are_logged_on_the_logging_steps_only(tmp_path):
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from visdistill import KD, DigitsDataModule

    module = DistillationModule(
        student=ModelConfig(**CNN), teachers=[ModelConfig(**CNN)], terms=[KD()]
    )
    calls, log_dict = [], module.log_dict

    def spy(metrics, *args, **kwargs):
        calls.append((module.global_step, sorted(metrics)))
        return log_dict(metrics, *args, **kwargs)

    module.log_dict = spy
    trainer = L.Trainer(
        max_steps=6,
        log_every_n_steps=3,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="run"),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))
    # The first step (callback_metrics filled early) and the steps Lightning hands to loggers.
    assert calls == [(s, ["train/ce", "train/kd"]) for s in (0, 2, 5)]
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {
        key: {int(r["step"]) for r in rows if r.get(key)} for key in ("train/loss", "train/kd")
    }
    # The logger gets every component on every step it records, as before.
    assert steps["train/kd"] == steps["train/loss"] == {2, 5}
    assert {"train/ce", "train/kd"} <= set(trainer.callback_metrics)
