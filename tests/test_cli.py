import subprocess
import sys

import pytest
import yaml

from visdistill.commands import main

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "limit_predict_batches": 1,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
    "model": {
        "student": {"name": "resnet10t", "num_classes": 10},
        "teachers": [{"name": "convnext_atto", "num_classes": 10}],
        "terms": [{"class_path": "visdistill.KD", "init_args": {"temperature": 2.0}}],
    },
    "data": {"class_path": "visdistill.DigitsDataModule", "init_args": {"batch_size": 16}},
}


def _write(tmp_path, config):
    path = tmp_path / "c.yaml"
    config = {
        **config,
        "trainer": {**config["trainer"], "default_root_dir": str(tmp_path / "runs")},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_test_and_export_through_the_cli(tmp_path, capsys):
    cfg = _write(tmp_path, CONFIG)
    main(["fit", "--config", cfg, "--test_after_fit", "true"])
    ckpts = list((tmp_path / "runs").rglob("last.ckpt"))
    assert len(ckpts) == 1 and (ckpts[0].parent / "best.ckpt").exists()
    main(["export", str(ckpts[0]), "--out", str(tmp_path / "exp"), "--dtype", "float16"])
    assert (tmp_path / "exp" / "model.safetensors").exists() and (
        tmp_path / "exp" / "config.json"
    ).exists()


def test_print_config_shows_resolved_defaults(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", _write(tmp_path, CONFIG), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["ce_weight"] == 1.0
    assert printed["model"]["terms"][0]["init_args"]["temperature"] == 2.0


def test_unknown_config_key_is_rejected_by_lightning_cli(tmp_path, capsys):
    bad = {**CONFIG, "model": {**CONFIG["model"], "temprature": 3}}
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", _write(tmp_path, bad)])
    assert e.value.code != 0
    assert "temprature" in capsys.readouterr().err


def test_unknown_model_name_is_one_clear_line(tmp_path):
    bad = {
        **CONFIG,
        "model": {**CONFIG["model"], "student": {"name": "resnet_10t", "num_classes": 10}},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "visdistill", "fit", "--config", _write(tmp_path, bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "unknown timm model 'resnet_10t'" in proc.stderr and "resnet10t" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_top_level_help_lists_commands(capsys):
    main([])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("fit", "validate", "test", "predict", "export"))
