"""What a user sees: plain progress lines in job logs, the distiller's model summary, the run
summary and summary.json, teacher names in metrics, no dependency noise."""

import json
import logging
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn

from visdistill import DigitsDataModule, DistillationModule, ModelConfig
from visdistill.cli import lightning_main, main
from visdistill.errors import ConfigError
from visdistill.formatting import format_count, format_duration, format_metric
from visdistill.models import short_name
from visdistill.progress import (
    LogLineProgressBar,
    make_progress_bar,
    percent_accuracies,
)
from visdistill.quiet import ExpectedWarnings, quiet_dependencies
from visdistill.summary import RunSummary, count_flops
from visdistill.teachers import TeacherEnsemble

EPOCHS = 2
CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": EPOCHS,
        "limit_train_batches": 3,
        "limit_val_batches": 2,
        "limit_test_batches": 2,
        "accelerator": "cpu",
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "RUNS", "name": "tiny", "version": ""},
        },
    },
    "model": {
        "student": {"name": "resnet10t", "num_classes": 10},
        "teachers": [
            {"name": "convnext_atto", "num_classes": 10, "alias": "convnext"},
            {"name": "resnet10t", "num_classes": 10},
        ],
        "terms": [{"class_path": "visdistill.KD", "init_args": {"temperature": 2.0}}],
    },
    "data": {"class_path": "visdistill.DigitsDataModule", "init_args": {"batch_size": 16}},
    "test_after_fit": True,
}


def _config(tmp_path, **trainer):
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"].update(trainer)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_fit_in_a_job_log(tmp_path, capsys):
    """Output captured (a pipe, as in a batch job): one line per epoch, no noise, the
    distiller's summary, the run summary with the export command, summary.json."""
    proc = subprocess.run(
        [sys.executable, "-m", "visdistill.cli", "fit", "--config", _config(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == EPOCHS, out
    for e, line in enumerate(epoch_lines, 1):
        assert line.startswith(f"epoch {e}/{EPOCHS} | batch 3/3 | ")
        assert re.search(r"\d+ img/s", line) and "loss " in line and "(ce " in line
        assert "kd " in line and re.search(r"val/acc \d+\.\d\d %", line), line
        assert "ETA" in line
    # No third-party tips, deprecations or misleading summary rows.
    for noise in ("Tip", "DeprecationWarning", "FutureWarning", "deprecated", "eval mode"):
        assert noise not in out, noise
    assert "Total FLOPs: 0" not in out and "Mode" not in out
    assert "━" not in proc.stdout  # no rich bar frames in a log
    # The distiller's model summary: student, both teachers by name, the term, FLOPs.
    assert re.search(r"student\s+resnet10t\s+resnet10t\s+4\.9\d M\s+4\.9\d M\s+\S+ M", out)
    assert re.search(r"teacher\s+convnext\s+convnext_atto\s+3\.\d+ M\s+frozen", out)
    assert re.search(r"teacher\s+resnet10t\s+resnet10t\s+4\.9\d M\s+frozen", out)
    assert re.search(r"term\s+kd\s+KD", out) and "compute: the teachers' forward" in out
    # The run summary.
    run_dir = tmp_path / "runs" / "tiny"
    best = run_dir / "checkpoints" / "best.ckpt"
    assert "visdistill run summary" in out
    assert re.search(r"test top-1\s+student \d+\.\d\d % \| convnext \d+\.\d\d % \|", out)
    assert "ensemble " in out and "gap to best" in out
    assert f"visdistill export {best} --out {run_dir / 'student'}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher_names"] == ["convnext", "resnet10t"]
    assert set(summary["test"]["teachers"]) == {"convnext", "resnet10t"}
    assert 0 <= summary["test"]["student"] <= 1 and "ensemble" in summary["test"]
    assert summary["best_epoch"] in range(1, EPOCHS + 1) and summary["epochs"] == EPOCHS
    best_teacher = max(summary["test"]["teachers"].values())
    assert summary["gap_to_best_teacher"] == pytest.approx(
        100 * (summary["test"]["student"] - best_teacher), abs=0.01
    )
    assert summary["train_images"] == EPOCHS * 3 * 16 and summary["train_images_per_s"] > 0
    assert summary["best_checkpoint"] == str(best)
    assert summary["export_command"].startswith("visdistill export ")
    # The checkpoint records the names the teachers' metrics were logged under.
    assert torch.load(best, weights_only=True)["teacher_names"] == ["convnext", "resnet10t"]
    # `visdistill test` on that checkpoint: one block with names and percentages, not
    # Lightning's table of raw fractions.
    main(["test", "--config", _config(tmp_path), "--ckpt_path", str(best)])
    printed = capsys.readouterr().out
    assert f"visdistill test ({best})" in printed
    assert re.search(r"top-1  student \d+\.\d\d % \| convnext \d+\.\d\d % \| resnet10t ", printed)
    assert "Test metric" not in printed and "test/convnext_acc" not in printed


def test_terminal_keeps_the_rich_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert isinstance(make_progress_bar("auto"), RichProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert isinstance(make_progress_bar("auto"), LogLineProgressBar)
    assert isinstance(make_progress_bar("bar"), RichProgressBar)
    with pytest.raises(ConfigError, match="progress must be"):
        make_progress_bar("fancy")
    shown = percent_accuracies(
        {"train/loss": torch.tensor(1.5), "val/acc": torch.tensor(0.7751), "v_num": 3}
    )
    assert shown == {"train/loss": 1.5, "val/acc": "77.51 %", "v_num": 3}
    # Through the CLI, `--progress bar` trains with the rich bar.
    cli = lightning_main(["fit", "--config", _config(tmp_path, max_epochs=1), "--progress", "bar"])
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    assert cli.trainer.current_epoch == 1


def test_progress_lines_every_n_steps_average_the_losses(tmp_path):
    lines = []

    class Bar(LogLineProgressBar):
        def print(self, *args, **kwargs):
            lines.append(" ".join(map(str, args)))

    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    class Probe(L.Callback):  # logs as KNNProbe does
        def on_validation_epoch_end(self, trainer, pl_module):
            pl_module.log("val/knn_top1", 0.6789)

    module = DistillationModule(
        student=ModelConfig("resnet10t", num_classes=10),
        teachers=[ModelConfig("resnet10t", num_classes=10)],
        terms=[{"class_path": "visdistill.KD", "init_args": {"temperature": 2.0}}],
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=5,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[Bar(every_n_steps=2, every_minutes=None), Losses(), Probe()],
    )
    trainer.fit(module, DigitsDataModule(batch_size=8))
    # Batches 2 and 4 inside the epoch, then the epoch's line after validation.
    assert [line.split(" | ")[1] for line in lines] == ["batch 2/5", "batch 4/5", "batch 5/5"]
    expected = [sum(losses[0:2]) / 2, sum(losses[2:4]) / 2, losses[4]]
    shown = [float(re.search(r"loss (\S+)", line).group(1)) for line in lines]
    assert shown == pytest.approx(expected, rel=1e-3)
    assert "val/acc" in lines[-1] and "val/acc" not in lines[0]
    assert "val/knn_top1 67.89 %" in lines[-1]  # the probes' scores, as percentages


def test_progress_rejects_bad_intervals():
    with pytest.raises(ConfigError, match="every_n_steps"):
        LogLineProgressBar(every_n_steps=0)
    with pytest.raises(ConfigError, match="every_minutes"):
        LogLineProgressBar(every_minutes=-1)


def test_formatting():
    assert format_duration(8.24) == "8.2s"
    assert format_duration(75.3) == "1m15s"
    assert format_duration(3725) == "1h02m05s"
    assert format_metric("test/acc", 0.7750999927520752) == "77.51 %"
    assert format_metric("val/fmnist_resnet10t_acc", 0.9) == "90.00 %"
    assert format_metric("train/loss", 1.23456) == "1.235"
    assert format_metric("val/linear_top1", 0.5) == "50.00 %"
    assert format_count(578_128, " ") == "578 k" and format_count(4.93e9) == "4.93G"
    assert format_count(999) == "999"


def test_teacher_names_are_short_unique_and_validated():
    assert short_name("zoo:fmnist_resnet10t") == "fmnist_resnet10t"
    assert short_name("hf-hub:timm/vit_small_patch14_dinov2.lvd142m") == (
        "vit_small_patch14_dinov2.lvd142m"
    )
    assert short_name("local-dir:/models/my_vit/") == "my_vit"
    assert short_name("resnet18") == "resnet18"
    ensemble = TeacherEnsemble(
        [
            ModelConfig("resnet10t", num_classes=3),
            ModelConfig("resnet10t", num_classes=3),
            ModelConfig("resnet10t", num_classes=3, alias="ensemble"),
        ]
    )
    assert ensemble.names == ["resnet10t", "resnet10t_2", "ensemble_2"]
    with pytest.raises(ConfigError, match="alias 'my teacher'"):
        TeacherEnsemble([ModelConfig("resnet10t", num_classes=3, alias="my teacher")])


def test_frozen_teachers_read_eval_from_construction():
    ensemble = TeacherEnsemble([ModelConfig("resnet10t", num_classes=3)])
    assert not any(m.training for m in ensemble.modules())


def test_count_flops_matches_hand_count_and_changes_nothing():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    # A 3x3 conv from 3 to 8 channels on 16x16: 2 * 8 * 3 * 9 * 16 * 16 FLOPs.
    conv.train()
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    state = torch.get_rng_state()
    assert count_flops(conv, 16) == 2 * 8 * 3 * 9 * 16 * 16
    assert conv.training  # restored
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in before.items())
    assert torch.equal(state, torch.get_rng_state())


def test_quiet_dependencies_drops_only_the_known_log_lines(caplog):
    tip = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    filters_before = list(warnings.filters)
    with quiet_dependencies(), caplog.at_level(logging.INFO, logger=tip.name):
        tip.info("💡 Tip: For seamless cloud logging ...")
        tip.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    assert warnings.filters == filters_before and not tip.filters  # nothing outlives the block


def test_quiet_dependencies_filters_the_pytree_warning_itself():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not pytest's filters: only ours may drop anything
        with quiet_dependencies():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use", FutureWarning, 2)
            warnings.warn("a real problem with your set-up", UserWarning, 2)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, after", FutureWarning, 2)
    assert [str(w.message) for w in caught] == [
        "a real problem with your set-up",
        "`isinstance(treespec, LeafSpec)` is deprecated, after",
    ]


def test_expected_warnings_name_the_exact_count():
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    expected = ExpectedWarnings(eval_modules=12, skipped_steps=True, exact_iterable_length=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected.enter()
        warnings.warn(
            "Your `IterableDataset` has `__len__` defined. In combination", UserWarning, 2
        )
        warnings.warn("Found 12 module(s) in eval mode at the start", PossibleUserWarning, 2)
        warnings.warn("Found 13 module(s) in eval mode at the start", PossibleUserWarning, 2)
        warnings.warn("`training_step` returned `None`. If this was on purpose", UserWarning, 2)
        expected.exit()
        expected.exit()  # idempotent
        warnings.warn("Found 12 module(s) in eval mode at the start", PossibleUserWarning, 2)
    assert [str(w.message) for w in caught] == [
        "Found 13 module(s) in eval mode at the start",
        "Found 12 module(s) in eval mode at the start",
    ]


def test_run_summary_keeps_the_best_epoch_across_a_resume():
    summary = RunSummary()
    summary.best_val, summary.best_epoch = 0.8, 3
    restored = RunSummary()
    restored.load_state_dict(summary.state_dict())
    assert (restored.best_val, restored.best_epoch) == (0.8, 3)
