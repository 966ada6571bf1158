"""Headless models (num_classes 0) and label-free training (issue 19, item 1)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from visdistill import KD, UNIC, DigitsDataModule, DistillationModule, ModelConfig
from visdistill.cli import main
from visdistill.errors import ConfigError
from visdistill.models import ModelOutput

TINY = dict(name="resnet10t", model_kwargs=dict(channels=(8, 8, 16, 16), stem_width=8))


def _model(num_classes: int, alias: str | None = None, **extra) -> ModelConfig:
    return ModelConfig(**TINY, num_classes=num_classes, alias=alias, **extra)


def _fit(module: DistillationModule, data=None) -> L.Trainer:
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data or DigitsDataModule(batch_size=16))
    return trainer


def test_headless_teacher_with_unic_trains():
    module = DistillationModule(
        student=_model(10), teachers=[_model(0, "feat")], terms=[UNIC(drop_prob=0.0)]
    )
    before = {k: v.clone() for k, v in module.terms.state_dict().items()}
    trainer = _fit(module)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/unic"]) and "val/acc" in metrics
    assert "val/feat_acc" not in metrics  # a feature teacher has no accuracy
    # The running standardisers learnt the headless teacher's pooled features.
    assert not torch.equal(before["0.cls_stats.0.mean"], module.terms[0].cls_stats[0].mean)


def test_headless_model_output_has_no_logits():
    from visdistill.models import Backbone

    out = Backbone(**TINY, num_classes=0)(torch.rand(2, 3, 32, 32))
    assert out.logits is None and out.pooled.shape == (2, 16)


def test_mixed_ensemble_feeds_each_term_its_own_teachers():
    seen: dict[str, list[list[ModelOutput]]] = {"kd": [], "unic": []}

    class SpyKD(KD):
        def forward(self, student, teachers, target, teacher_weights=None):
            seen["kd"].append(list(teachers))
            return super().forward(student, teachers, target, teacher_weights)

    class SpyUNIC(UNIC):
        def forward(self, student, teachers, target, teacher_weights=None):
            seen["unic"].append(list(teachers))
            return super().forward(student, teachers, target, teacher_weights)

    module = DistillationModule(
        student=_model(10),
        teachers=[_model(10, "clf"), _model(0, "feat")],
        terms=[SpyKD(teachers=["clf"]), SpyUNIC(teachers=["feat"])],
    )
    kd, unic = module.terms
    assert (kd.teacher_indices, unic.teacher_indices) == ((0,), (1,))
    assert len(unic.cls_ladders) == 1  # UNIC built projectors for its one teacher only
    trainer = _fit(module)
    assert seen["kd"] and seen["unic"]
    assert all(len(ts) == 1 and ts[0].logits is not None for ts in seen["kd"])
    assert all(len(ts) == 1 and ts[0].logits is None for ts in seen["unic"])
    metrics = trainer.callback_metrics
    assert {"train/kd", "train/unic", "val/acc", "val/clf_acc"} <= set(metrics)
    assert "val/feat_acc" not in metrics and "val/ensemble_acc" not in metrics


def test_kd_reading_a_headless_teacher_is_one_clear_error():
    with pytest.raises(
        ConfigError, match=r"KD reads the teachers' logits.*feat.*teachers: \[clf\]"
    ):
        DistillationModule(
            student=_model(10), teachers=[_model(10, "clf"), _model(0, "feat")], terms=[KD()]
        )
    with pytest.raises(ConfigError, match="KD reads the student's logits.*headless"):
        DistillationModule(student=_model(0), teachers=[_model(10)], terms=[KD()])
    with pytest.raises(ConfigError, match="'nope' is not a teacher.*0: clf"):
        DistillationModule(student=_model(10), teachers=[_model(10, "clf")], terms=[KD(teachers=["nope"])])  # fmt: skip


def test_other_refusals_name_the_headless_model(tmp_path):
    from visdistill import ND

    # A headless teacher's features can be cached (UNIC reads pooled features and a stage).
    DistillationModule(
        student=_model(10), teachers=[_model(0)], terms=[UNIC()], teacher_cache=str(tmp_path)
    )
    with pytest.raises(ConfigError, match="ND keeps one teacher class mean .* headless"):
        DistillationModule(student=_model(0), teachers=[_model(10)], terms=[ND(cache_dir="")])
    with pytest.raises(ConfigError, match="headless .* no classifier to train with labels"):
        DistillationModule(student=_model(0))
    module = DistillationModule(student=_model(0), teachers=[_model(0)], terms=[UNIC()])
    with pytest.raises(ConfigError, match="headless .* predicts no classes"):
        module.predict_step({"image": torch.rand(2, 3, 32, 32), "index": torch.arange(2)}, 0)


def test_validation_loss_without_accuracy_keeps_every_teacher():
    """UNIC drops teachers in training only: val/loss is the same on every pass."""
    module = DistillationModule(
        student=_model(0), teachers=[_model(0), _model(0)], terms=[UNIC(drop_prob=0.9)]
    ).eval()
    batch = {"image": torch.rand(8, 3, 32, 32), "target": torch.full((8,), -1)}
    with torch.no_grad():
        first, _, out = module.compute_losses(batch)
        weights = module.terms[0](
            out, module.teachers(batch["image"], (-1,), True), batch["target"]
        ).teacher_weights
        assert torch.equal(module.compute_losses(batch)[0], first)
    assert torch.equal(weights, torch.full((8, 2), 0.5))


def test_headless_student_with_feature_term_logs_no_accuracy():
    module = DistillationModule(
        student=_model(0), teachers=[_model(10, "clf")], terms=[UNIC(drop_prob=0.0)]
    )
    assert not hasattr(module, "val_acc")  # no torchmetrics accuracy for a headless student
    assert module.selection_metric() == ("val/loss", "min")
    trainer = _fit(module)
    metrics = trainer.callback_metrics
    assert "train/acc" not in metrics and "val/acc" not in metrics and "train/ce" not in metrics
    assert torch.isfinite(metrics["val/loss"]) and torch.isfinite(metrics["train/unic"])
    assert "val/clf_acc" in metrics  # the classifier teacher is still scored on labelled data
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, 16)  # pooled features


def test_labels_false_trains_label_free_and_refuses_what_needs_labels():
    data = DigitsDataModule(batch_size=16, labels=False)
    data.setup("fit")
    assert not data.has_labels and (data.train_set.targets == -1).all()
    module = DistillationModule(
        student=_model(10), teachers=[_model(10, "clf")], terms=[KD()], ce_weight=0.0
    )
    trainer = _fit(module, data)
    metrics = trainer.callback_metrics
    assert "val/acc" not in metrics and "train/acc" not in metrics and "val/clf_acc" not in metrics
    assert torch.isfinite(metrics["val/loss"]) and module.selection_metric() == ("val/loss", "min")
    needs_ce = DistillationModule(student=_model(10), teachers=[_model(10)], terms=[KD()])
    with pytest.raises(ConfigError, match="ce_weight 1.0 .* has none.*ce_weight: 0"):
        _fit(needs_ce, DigitsDataModule(batch_size=16, labels=False))


def _write_flat_folder(root, n: int = 20) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:02d}.png")


def test_image_folder_with_images_and_class_folders_is_refused(tmp_path):
    from visdistill import ImageFolderDataModule
    from visdistill.errors import DataNotFoundError

    _write_flat_folder(tmp_path / "mixed", n=2)
    (tmp_path / "mixed" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "cat" / "a.png")
    with pytest.raises(DataNotFoundError, match="holds both images .* and class sub-folders"):
        ImageFolderDataModule(train_dir=str(tmp_path / "mixed"))
    _write_flat_folder(tmp_path / "flat", n=2)
    assert not ImageFolderDataModule(train_dir=str(tmp_path / "flat")).has_labels


def test_flat_image_folder_trains_label_free_through_the_cli_and_exports(tmp_path, capsys):
    _write_flat_folder(tmp_path / "images")
    config = {
        "seed_everything": 0,
        "model": {
            "student": {**TINY, "num_classes": 0},
            "teachers": [{**TINY, "num_classes": 0, "alias": "feat"}],
            "terms": [{"class_path": "visdistill.UNIC", "init_args": {"drop_prob": 0.0}}],
        },
        "data": {
            "class_path": "visdistill.ImageFolderDataModule",
            "init_args": {"train_dir": str(tmp_path / "images"), "batch_size": 8, "val_split": 4},
        },
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "accelerator": "cpu",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "flat", "version": ""},
            },
        },
        "progress": "lines",
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    main(["fit", "--config", str(path)])
    ckpts = tmp_path / "runs" / "flat" / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    summary = json.loads((tmp_path / "runs" / "flat" / "summary.json").read_text())
    assert summary["best_val_acc"] is None and summary["best_val_loss"] is not None
    assert set(summary["val"]) == {"loss"}  # no accuracy anywhere, the distillation loss
    out = capsys.readouterr().out
    assert "best val/loss" in out and "val loss" in out and "no accuracy" in out

    main(["export", str(ckpts / "best.ckpt"), "--out", str(tmp_path / "student")])
    exported = json.loads((tmp_path / "student" / "config.json").read_text())
    assert exported["num_classes"] == 0
    model = timm.create_model(
        "resnet10t",
        pretrained=True,
        num_classes=0,
        **TINY["model_kwargs"],
        pretrained_cfg_overlay=dict(file=str(tmp_path / "student" / "model.safetensors")),
    ).eval()
    ckpt = torch.load(ckpts / "best.ckpt", weights_only=True, map_location="cpu")
    monitors = [k for k in ckpt["callbacks"] if "monitor" in k]
    assert any("'monitor': 'val/loss'" in k and "'mode': 'min'" in k for k in monitors), monitors
    weight = ckpt["state_dict"]["student.model.conv1.0.weight"]
    assert torch.equal(model.state_dict()["conv1.0.weight"], weight)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 16)
