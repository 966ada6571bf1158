"""Nothing lost, nothing silently wrong (issue 16): commands never delete or overwrite what
they did not write, checkpoints are written atomically and checked on load, runs do not
share a folder by accident, and evaluation never silently uses an untrained student.

Each test failed on the code before its fix (noted per test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hostile_input import _run
from test_resume import _cli_config

from visdistill import KD, DigitsDataModule, DistillationModule, ModelConfig
from visdistill.cli import main
from visdistill.errors import CheckpointError, ConfigError
from visdistill.export import export_student
from visdistill.teacher_cache import TeacherCache, build_teacher_cache

TEST_RESNET = dict(name="test_resnet", num_classes=10)
DATA = dict(batch_size=16, train_subset=48, val_split=32)


def _module():
    torch.manual_seed(0)
    return DistillationModule(
        student=ModelConfig(**TEST_RESNET),
        teachers=[ModelConfig(**TEST_RESNET)],
        terms=[KD(temperature=2.0)],
        eval_teachers=False,
    )


def _data():
    dm = DigitsDataModule(**DATA)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------- teacher cache
def test_cache_out_never_deletes_a_folder_that_is_not_a_cache(tmp_path, capsys):
    """Before: `visdistill cache --out runs` ran shutil.rmtree(runs)."""
    runs = tmp_path / "runs"
    (runs / "quickstart").mkdir(parents=True)
    (runs / "quickstart" / "best.ckpt").write_bytes(b"weeks of GPU time")
    cfg = _cli_config(tmp_path)
    err = _run(["cache", "--config", cfg, "--out", str(runs), "--overwrite"], capsys)
    assert f"--out {runs} is a non-empty folder that is not a visdistill teacher cache" in err
    assert (runs / "quickstart" / "best.ckpt").read_bytes() == b"weeks of GPU time"
    assert len(err.strip().splitlines()) == 1


def test_cache_overwrite_replaces_only_the_caches_own_files(tmp_path):
    """Before: a second build silently replaced the folder, notes included."""
    out = tmp_path / "cache"
    build_teacher_cache(_module(), _data(), out, epochs=1, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a teacher cache; pass --overwrite"):
        build_teacher_cache(_module(), _data(), out, epochs=1, progress=False)
    build_teacher_cache(_module(), _data(), out, epochs=2, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert TeacherCache.open(out).manifest["epochs"] == 2
    assert not list(tmp_path.glob(".cache.building*"))  # no temporary folder left


def test_truncated_or_non_finite_cache_arrays_are_refused_on_open(tmp_path):
    """Before: a truncated array was numpy's "mmap length is greater than file size"
    traceback at the first step, a NaN in it trained silently on NaN targets."""
    out = build_teacher_cache(_module(), _data(), tmp_path / "c", epochs=1, progress=False)
    TeacherCache.open(out)  # intact: accepted
    rest = np.load(out / "rest.npy", mmap_mode="r+")
    rest[0, 3, 0] = np.nan
    rest.flush()
    del rest
    with pytest.raises(ConfigError, match=r"rest\.npy holds 1 NaN/inf value\(s\)"):
        TeacherCache.open(out)
    logp = out / "logp.npy"
    logp.write_bytes(logp.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"logp\.npy is truncated or damaged.*--overwrite"):
        TeacherCache.open(out)


# ----------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def fitted_checkpoint(tmp_path_factory):
    """A visdistill checkpoint of a tiny student (one training step)."""
    import lightning as L

    root = tmp_path_factory.mktemp("fitted")
    module = _module()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(**DATA))
    trainer.save_checkpoint(root / "m.ckpt")
    return root / "m.ckpt"


def test_export_refuses_a_non_empty_folder_unless_overwrite(fitted_checkpoint, tmp_path, capsys):
    """Before: the README's teacher recipe silently overwrote the shipped zoo weights."""
    out = tmp_path / "exp"
    main(["export", str(fitted_checkpoint), "--out", str(out)])
    (out / "README.md").write_text("mine")
    before = (out / "model.safetensors").read_bytes()
    err = _run(["export", str(fitted_checkpoint), "--out", str(out), "--dtype", "float16"], capsys)
    assert f"--out {out} is not empty (README.md, config.json, model.safetensors)" in err
    assert "--overwrite" in err and (out / "model.safetensors").read_bytes() == before
    main(["export", str(fitted_checkpoint), "--out", str(out), "--dtype", "float16", "--overwrite"])
    assert (out / "model.safetensors").read_bytes() != before
    assert (out / "README.md").read_text() == "mine"


def test_export_refuses_non_finite_weights_and_names_them(fitted_checkpoint, tmp_path):
    """Before: NaN weights and float16 overflows were exported without a word."""
    ckpt = torch.load(fitted_checkpoint, weights_only=True)
    ckpt["state_dict"]["student.model.fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(
        CheckpointError, match=r"non-finite \(NaN/inf\) student weights in fc\.weight"
    ):
        export_student(tmp_path / "nan.ckpt", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    ckpt["state_dict"]["student.model.fc.weight"][0, 0] = 1e6  # finite, but not in float16
    torch.save(ckpt, tmp_path / "big.ckpt")
    with pytest.raises(CheckpointError, match=r"fc\.weight exceed the range of float16"):
        export_student(tmp_path / "big.ckpt", tmp_path / "b", dtype="float16")
    export_student(tmp_path / "big.ckpt", tmp_path / "b")  # float32 holds it


# ----------------------------------------------------------------------- untrained evaluation
@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(command, tmp_path, capsys):
    """Before: printed the random student's metrics (about 10 %), exit code 0."""
    cfg = _cli_config(tmp_path)
    err = _run([command, "--config", cfg], capsys)
    assert f"`visdistill {command}` without --ckpt_path would evaluate the untrained" in err
    assert "--allow_untrained true" in err


def test_evaluation_of_the_untrained_student_on_purpose(tmp_path):
    cfg = _cli_config(tmp_path)
    main(["test", "--config", cfg, "--allow_untrained", "true"])
