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


def test_top_level_help_lists_every_subcommand_of_the_table(capsys):
    from visdistill.commands import COMMANDS

    main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert {"cache", "export", "cka", "zoo", "search", "mmdet"} <= set(COMMANDS)


def test_unknown_subcommand_names_the_close_matches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["exprot", "x.ckpt"])
    assert e.value.code == 2
    assert "unknown command 'exprot'. Did you mean: export?" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["export", "run.ckpt", "--out", "student"],
        ["cka", "--model_a", "resnet10t", "--model_b", "resnet10t", "--data", "digits"],
        ["search", "--teacher", "resnet10t", "--space", "family:resnet", "--budget", "3"],
        ["zoo", "evaluate", "fmnist_resnet10t", "--limit", "10"],
        ["mmdet", "convert", "a.pth", "b.safetensors", "--prefix", "student."],
        ["convert", "images/", "--out", "shards/", "--chunk_bytes", "1MB"],
    ],
)
def test_every_subcommand_prints_its_config_and_reads_it_back(tmp_path, capsys, args):
    """--print_config writes YAML that --config reads back to the same options, and options
    given after --config override the file."""
    import importlib

    from visdistill.commands import COMMANDS
    from visdistill.commands.parsing import parse

    module = importlib.import_module(f"visdistill.commands.{COMMANDS[args[0]][0]}")
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(printed))
    direct = parse(module.build_parser(), args[1:]).as_dict()
    if args[0] in ("zoo", "mmdet"):  # nested subcommands: the file goes to the subcommand
        sub = args[1]
        from_file = parse(module.build_parser(), [sub, "--config", str(path)]).as_dict()[sub]
        direct = direct[sub]
    else:
        from_file = parse(module.build_parser(), ["--config", str(path)]).as_dict()
    from_file.pop("config"), direct.pop("config")
    assert from_file == direct
    assert printed == direct
    if args[0] == "export":
        again = parse(module.build_parser(), ["--config", str(path), "--dtype", "float16"])
        assert again.dtype == "float16" and again.checkpoint == "run.ckpt"


def test_former_argparse_spellings_are_accepted():
    from visdistill.commands import export, search
    from visdistill.commands.parsing import accept_legacy_spelling, parse

    parser = search.build_parser()
    args = ["--teacher", "t", "--space", "s", "--max-params=2M", "--batch-size", "16",
            "--no-progress", "--teacher-init", "trained"]  # fmt: skip
    assert accept_legacy_spelling(parser, args) == [
        "--teacher", "t", "--space", "s", "--max_params=2M", "--batch_size", "16",
        "--progress=false", "--teacher_init", "trained",
    ]  # fmt: skip
    ns = parse(parser, args)
    assert (ns.max_params, ns.batch_size, ns.progress) == ("2M", 16, False)
    # A bare boolean flag is true; one followed by a value keeps it.
    ns = parse(export.build_parser(), ["--overwrite", "c.ckpt", "--out", "o", "--input-size", "64"])
    assert ns.overwrite is True and ns.checkpoint == "c.ckpt" and ns.input_size == 64
    assert (
        parse(export.build_parser(), ["c.ckpt", "--out", "o", "--overwrite", "false"]).overwrite
        is False
    )
    # Values are never rewritten.
    assert accept_legacy_spelling(parser, ["--data", "--my-folder"]) == ["--data", "--my-folder"]


def test_a_config_file_error_is_one_line_for_every_subcommand(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("out: a\nout: b\n")
    for command in (["export"], ["cka"], ["search"], ["zoo", "list"], ["cache"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--config", str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 1, (command, err)
        assert f"{path}: line 2, column 1: invalid YAML: duplicate key 'out'" in err, err
        assert "Traceback" not in err
