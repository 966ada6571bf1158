"""Bad input through the command line: each gets a clear message, never a traceback.

The errors table in ``docs/errors.md`` lists these cases and the tests elsewhere that cover
the rest (checkpoints, data folders, zoo manifests, non-finite losses)."""

import pytest
import torch
import yaml
from test_cli import CONFIG, _write

from visdistill.cli import main


def _run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code != 0 and "Traceback" not in err
    return err


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  student: {name: resnet10t, num_classes: 10\n")
    err = _run(["fit", "--config", str(path)], capsys)
    assert f"{path}: line 3, column 1: invalid YAML" in err


def test_missing_config_file_names_the_path(tmp_path, capsys):
    err = _run(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "config file not found" in err and "nope.yaml" in err


def test_wrong_type_names_the_key(tmp_path, capsys):
    err = _run(["fit", "--config", _write(tmp_path, CONFIG), "--trainer.max_epochs", "abc"], capsys)
    assert 'Parser key "trainer.max_epochs"' in err and "abc" in err


def test_unknown_class_path_is_named(tmp_path, capsys):
    bad = {**CONFIG, "model": {**CONFIG["model"], "terms": [{"class_path": "visdistill.KDD"}]}}
    err = _run(["fit", "--config", _write(tmp_path, bad)], capsys)
    assert "visdistill.KDD" in err


def test_unknown_zoo_teacher_gets_close_matches(tmp_path, capsys):
    bad = {**CONFIG, "model": {**CONFIG["model"], "teachers": [{"name": "zoo:fmnist_resnet"}]}}
    err = _run(["fit", "--config", _write(tmp_path, bad)], capsys)
    assert "unknown zoo model zoo:fmnist_resnet. Did you mean: zoo:fmnist_resnet10t" in err


def test_teacher_checkpoint_problems_are_one_line(tmp_path, capsys):
    truncated = tmp_path / "t.pth"
    torch.save({"fc.weight": torch.zeros(10, 512)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    for path, message in [
        (tmp_path / "missing.safetensors", "checkpoint not found"),
        (truncated, "cannot read checkpoint"),
    ]:
        teacher = {"name": "resnet10t", "num_classes": 10, "checkpoint": str(path)}
        bad = {**CONFIG, "model": {**CONFIG["model"], "teachers": [teacher]}}
        err = _run(["fit", "--config", _write(tmp_path, bad)], capsys)
        assert message in err and str(path.name) in err
        assert len(err.strip().splitlines()) <= 2  # "Seed set to 0" may precede it


def test_class_count_mismatch_is_explained(tmp_path, capsys):
    model = {**CONFIG["model"], "teachers": [{"name": "convnext_atto", "num_classes": 5}]}
    err = _run(["fit", "--config", _write(tmp_path, {**CONFIG, "model": model})], capsys)
    assert "teachers predict 5 classes but the student resnet10t predicts 10" in err


def test_bad_stage_index_lists_the_stages(tmp_path, capsys):
    terms = [{"class_path": "visdistill.TRG", "init_args": {"student_stage": 7}}]
    model = {**CONFIG["model"], "terms": terms}
    err = _run(["fit", "--config", _write(tmp_path, {**CONFIG, "model": model})], capsys)
    assert "resnet10t has no stage(s) [7]; available stages: 0: act1 (64 ch, /2)" in err


def test_config_is_valid_yaml_but_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    err = _run(["fit", "--config", str(path)], capsys)
    assert "error" in err.lower()


def _one_line(err):
    """The one error line ("Seed set to 0", and a Python warning when pytest does not capture
    warnings, may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("visdistill ")]
    assert len(errors) == 1 and len(lines) <= 3, err
    return errors[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.init_args.batch_size", "0"], "batch_size must be positive, got 0"),
        (["--data.init_args.image_size", "0"], "image_size must be a positive side"),
        (["--data.init_args.val_split", "-0.1"], "val_split must be >= 0"),
        (
            ["--model.terms", '[{"class_path": "visdistill.KD", "init_args": {"temperature": 0}}]'],
            "KD temperature must be > 0, got 0.0",
        ),
    ],
    ids=["batch_size", "image_size", "val_split", "temperature"],
)
def test_bad_values_checked_while_instantiating_are_one_line(tmp_path, capsys, args, message):
    # Before: batch_size and temperature gave jsonargparse's ~75-line "does not validate against
    # any of the Union subtypes" traceback, image_size 0 a torch interpolate traceback, and
    # val_split -0.1 "leaves no training data".
    err = _run(["fit", "--config", _write(tmp_path, CONFIG), *args], capsys)
    assert message in _one_line(err) and _one_line(err).startswith("visdistill fit: error:")


def test_an_empty_class_folder_is_one_line_naming_it(tmp_path, capsys):
    from PIL import Image

    for c in ("cat", "dog", "fox"):
        (tmp_path / "train" / c).mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / f"{i}.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "fox" / f"{i}.png")
    data = {
        "class_path": "visdistill.ImageFolderDataModule",
        "init_args": {"train_dir": str(tmp_path / "train"), "batch_size": 2},
    }
    err = _run(["fit", "--config", _write(tmp_path, {**CONFIG, "data": data})], capsys)
    assert "class folder(s) ['dog'] in" in _one_line(err) and "hold no images" in err


def test_duplicate_yaml_keys_are_refused_with_the_key_and_line(tmp_path, capsys):
    # Before: PyYAML and jsonargparse kept the last value silently.
    path = tmp_path / "dup.yaml"
    path.write_text(
        "model:\n  student: {name: resnet10t, num_classes: 10}\n  ce_weight: 1.0\n"
        "  ce_weight: 0.0\n"
    )
    err = _run(["fit", "--config", str(path)], capsys)
    assert (
        f"{path}: line 4, column 3: invalid YAML: duplicate key 'ce_weight' (first at line 3)"
        in (_one_line(err))
    )
    # YAML merge keys override on purpose: not duplicates.
    ok = tmp_path / "merge.yaml"
    ok.write_text("base: &b {lr: 1}\nx:\n  <<: *b\n  lr: 2\n")
    from visdistill.commands.parsing import check_config_file

    check_config_file(str(ok))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_data_error_in_a_loader_worker_is_one_line(tmp_path, capsys, num_workers):
    """A corrupt image read in a worker process: the same one-line message as in the main
    process, not torch's re-raised worker traceback."""
    import numpy as np
    from PIL import Image

    from visdistill.cli import main

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((8, 8, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / label / f"{i}.png")
    (tmp_path / "train" / "a" / "2.png").write_bytes(b"not a png")
    config = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "runs")},
        "model": {"student": {"name": "resnet10t", "num_classes": 2}},
        "data": {"class_path": "visdistill.ImageFolderDataModule", "init_args": {
            "train_dir": str(tmp_path / "train"), "batch_size": 8, "val_split": 0,
            "image_size": 16, "num_workers": num_workers}},
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("visdistill fit: error:")]
    assert len(message) == 1, err
    assert "cannot read image" in message[0] and "2.png" in message[0]
    assert "Traceback" not in err and "Caught" not in err, err
