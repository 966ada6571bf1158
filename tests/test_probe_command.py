"""`visdistill probe` (issue 19 item 5): an exported student probed from the command line gives
exactly probe_exported's numbers, data by name or as a data module in a config file, the JSON
result, and one-line errors."""

from __future__ import annotations

import json

import lightning as L
import pytest
import yaml

from visdistill import DigitsDataModule, DistillationModule, ModelConfig, probe_exported
from visdistill.commands import main
from visdistill.commands.parsing import parse
from visdistill.commands.probe import build_parser
from visdistill.export import export_student

TINY = dict(
    name="resnet10t", num_classes=10, model_kwargs=dict(channels=(8, 8, 16, 16), stem_width=8)
)
# Small, fast probes: a capped reference set and one weight decay (no sweep).
FAST = ["--max_train_samples", "300", "--weight_decays", "[0.01]", "--device", "cpu"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A student after one training step on digits, written by `visdistill export`."""
    root = tmp_path_factory.mktemp("probe_command")
    L.seed_everything(0, verbose=False)
    module = DistillationModule(student=ModelConfig(**TINY))
    trainer = L.Trainer(
        fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(root / "m.ckpt")
    return export_student(root / "m.ckpt", root / "student")


def test_probe_by_name_prints_percent_and_writes_the_json(export_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "probe.json"
    main(["probe", str(export_dir), "--data", "digits", *FAST, "--json", str(out)])
    printed = capsys.readouterr().out
    expected = probe_exported(
        export_dir, DigitsDataModule(), max_train_samples=300, weight_decays=[0.01], device="cpu"
    )
    written = json.loads(out.read_text())
    assert written == {"export_dir": str(export_dir.resolve()), **expected}
    assert (written["split"], written["num_train"], written["num_eval"]) == ("test", 300, 359)
    assert written["feature_dim"] == 16 and written["linear_weight_decay"] == 0.01
    # Digits after one step, 300 references, chance 0.1: well above chance, below perfect.
    assert 0.2 < written["knn_top1"] < 1 and 0.2 < written["linear_top1"] < 1
    assert f"kNN top-1 (k=20, T=0.07): {100 * expected['knn_top1']:.2f} %" in printed
    assert f"linear-probe top-1: {100 * expected['linear_top1']:.2f} %" in printed
    assert "359 test images against 300 training images, 10 classes" in printed
    assert not list(out.parent.glob(".*tmp"))  # the atomic write left no temporary file


def test_probe_reads_a_data_module_from_a_config_file(export_dir, tmp_path, capsys):
    """class_path/init_args in YAML; its labels: false and augment: true are overridden for the
    probe; --split val scores the validation split; --linear false skips the linear probe."""
    data = {"val_split": 150, "labels": False, "augment": True}
    config = tmp_path / "probe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"class_path": "visdistill.DigitsDataModule", "init_args": data},
                "split": "val",
                "linear": False,
                "k": 5,
            }
        )
    )
    main(["probe", str(export_dir), "--config", str(config), *FAST])
    printed = capsys.readouterr().out
    expected = probe_exported(
        export_dir, DigitsDataModule(**data), split="val", linear=False, k=5,
        max_train_samples=300, device="cpu",
    )  # fmt: skip
    assert expected["num_eval"] == 150
    assert f"kNN top-1 (k=5, T=0.07): {100 * expected['knn_top1']:.2f} %" in printed
    assert "linear-probe" not in printed and "150 val images" in printed


def test_print_config_reads_back(tmp_path, capsys):
    args = ["some/export", "--data", "fashion_mnist", "--k", "10", "--json", "r.json"]
    with pytest.raises(SystemExit) as e:
        main(["probe", *args, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(printed))
    direct = parse(build_parser(), args).as_dict()
    from_file = parse(build_parser(), ["--config", str(path)]).as_dict()
    from_file.pop("config"), direct.pop("config")
    assert from_file == direct == printed
    assert (printed["k"], printed["data"], printed["json"]) == (10, "fashion_mnist", "r.json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "is not a `visdistill export` folder"),
        (["--data", "no_such_data"], "neither a named data set"),
        (["--split", "train"], "split must be 'val' or 'test'"),
    ],
)
def test_bad_input_is_one_line(export_dir, tmp_path, capsys, args, message):
    target = tmp_path if not args else export_dir  # tmp_path holds no export
    with pytest.raises(SystemExit) as e:
        main(["probe", str(target), "--data", "digits", *args])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("visdistill probe: error: ") and message in err
    assert "Traceback" not in err
