"""The README's two-command path from a folder of images to a cached, augmented, distilled
student (configs/kd_image_folder_cached.yaml), run as the README writes it on a small PNG
folder, and the recipe kept in step with the benchmarks that measure it."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from visdistill.commands import main
from visdistill.data import fashion_mnist_folder
from visdistill.teacher_cache import TeacherCache
from visdistill.teachers import TeacherEnsemble

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "kd_image_folder_cached.yaml"
SECTION = "## From a folder of images to a cached, augmented, distilled student"


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def _readme_commands() -> list[list[str]]:
    """The ``visdistill ...`` lines of the section's first bash block, split as a shell does."""
    block = re.search(r"```bash\n(.*?)```", _readme_section(), re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("visdistill ")]


def _no_teachers(*a, **k):
    raise AssertionError("a teacher ran while training from the cache")


def test_the_readme_s_two_commands_train_a_student_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the README's relative paths land here
    cache_cmd, fit_cmd = _readme_commands()
    assert cache_cmd[:2] == ["visdistill", "cache"] and fit_cmd[:2] == ["visdistill", "fit"]

    # The README's way to get a folder: its python -c line, with a smaller folder written.
    snippet = re.search(r'`python -c "([^"]+)"`', _readme_section()).group(1)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(fashion_mnist_folder, "write_fashion_mnist_folder", lambda *a: calls.append(a))
        exec(snippet, {})
    (folder, count) = calls[0]
    train_dir = cache_cmd[cache_cmd.index("--data.init_args.train_dir") + 1]
    assert folder == train_dir == fit_cmd[fit_cmd.index("--data.init_args.train_dir") + 1]
    assert count >= 1000
    fashion_mnist_folder.write_fashion_mnist_folder(folder, 48)

    def small(command: list[str]) -> list[str]:
        """The command with the repository's config and a one-epoch, batch-8 schedule."""
        args = [str(CONFIG) if a == "configs/kd_image_folder_cached.yaml" else a for a in command]
        return args[1:] + ["--trainer.max_epochs", "1", "--data.init_args.batch_size", "8"]

    main(small(cache_cmd))
    out = cache_cmd[cache_cmd.index("--out") + 1]
    assert f"teacher cache written to {out}" in capsys.readouterr().out
    manifest = TeacherCache.open(tmp_path / out).manifest
    augmentation = manifest["augmentation"]
    assert augmentation["mixing"]["mixup_alpha"] == 0.8  # mixed batches are in the cache
    assert manifest["epochs"] == 1 and manifest["top_k"] == 10
    assert manifest["teacher_names"] == [
        "zoo:fmnist_resnet10t", "zoo:fmnist_vit_tiny_p8", "zoo:fmnist_convnext_atto",
    ]  # fmt: skip

    with monkeypatch.context() as m:
        m.setattr(TeacherEnsemble, "forward", _no_teachers)  # the config's cache, not teachers
        main(small(fit_cmd))
    run = tmp_path / "runs" / "kd_image_folder_cached"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()


def test_a_cache_for_other_epochs_is_refused_by_the_fit(tmp_path, monkeypatch, capsys):
    """The exact cache belongs to its fit: two epochs of training from a one-epoch cache is
    refused with the rebuild command, before any step."""
    monkeypatch.chdir(tmp_path)
    fashion_mnist_folder.write_fashion_mnist_folder("imgs", 32)
    base = ["--config", str(CONFIG), "--data.init_args.train_dir", "imgs",
            "--data.init_args.batch_size", "8"]  # fmt: skip
    main(["cache", *base, "--trainer.max_epochs", "1", "--out", "cache/kd_image_folder"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *base, "--trainer.max_epochs", "2"])
    assert exit_.value.code == 1
    assert re.search(r"holds 1 epochs.*trains 2; rebuild with --epochs 2", capsys.readouterr().err)
    assert not (tmp_path / "runs" / "kd_image_folder_cached" / "checkpoints").exists()


def test_the_recipe_is_the_one_the_benchmarks_measure(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "image_folder_common", ROOT / "benchmarks" / "image_folder_common.py"
    )
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    kd_spec = importlib.util.spec_from_file_location(
        "image_folder_kd", ROOT / "benchmarks" / "image_folder_kd.py"
    )
    kd = importlib.util.module_from_spec(kd_spec)
    kd_spec.loader.exec_module(kd)
    config = yaml.safe_load(CONFIG.read_text())
    model, data = config["model"], config["data"]["init_args"]

    assert model["student"] == {"name": common.STUDENT, "num_classes": common.NUM_CLASSES}
    assert [t["name"] for t in model["teachers"]] == common.TEACHERS
    assert [t["class_path"] for t in model["terms"]] == ["visdistill.KD"]
    assert model["terms"][0]["init_args"]["temperature"] == common.TEMPERATURE
    assert model["eval_teachers"] is False
    built = common.distillation_module(teachers=False, epochs=8)
    optimizer = built.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert model["optimizer"]["init_args"] == {
        "lr": optimizer.defaults["lr"], "weight_decay": optimizer.defaults["weight_decay"],
    }  # fmt: skip
    assert model["scheduler"]["init_args"]["T_max"] == config["trainer"]["max_epochs"]
    assert config["trainer"]["max_epochs"] == kd.FULL["epochs"]
    assert data["image_size"] == common.SIZE and data["batch_size"] == kd.FULL["batch_size"]
    augmentation = {k: data[k] for k in common.AUGMENT}
    assert augmentation == {
        k: list(v) if isinstance(v, tuple) else v for k, v in common.AUGMENT.items()
    }
    assert {k: data[k] for k in common.MIX} == common.MIX
