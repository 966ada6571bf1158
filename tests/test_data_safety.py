"""Nothing lost, nothing silently wrong (issue 16): commands never delete or overwrite what
they did not write, checkpoints are written atomically and checked on load, runs do not
share a folder by accident, and evaluation never silently uses an untrained student.

Each test failed on the code before its fix (noted per test)."""

from __future__ import annotations

import functools
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_hostile_input import _run
from test_resume import _cli_config, _student

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
    for overwrite in ([], ["--overwrite"]):  # --overwrite replaces caches only
        err = _run(["cache", "--config", cfg, "--out", str(runs), *overwrite], capsys)
        assert (runs / "quickstart" / "best.ckpt").read_bytes() == b"weeks of GPU time"
        assert f"--out {runs} is a non-empty folder that is not a visdistill teacher cache" in err
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


def test_truncated_or_non_finite_cache_arrays_are_refused(tmp_path):
    """Before: a truncated array was numpy's "mmap length is greater than file size"
    traceback at the first step, a NaN in it trained silently on NaN targets. A truncated
    file is refused on open; a NaN when it is read (opening reads no values)."""
    out = build_teacher_cache(_module(), _data(), tmp_path / "c", epochs=1, progress=False)
    TeacherCache.open(out)  # intact: accepted
    head = np.load(out / "e0000-s00000.head.npy", mmap_mode="r+")
    head["rest"][3, 0] = np.nan
    head.flush()
    del head
    cache = TeacherCache.open(out)
    every = torch.from_numpy(np.flatnonzero(cache._slot_of(0) >= 0))
    with pytest.raises(ConfigError, match=r"head\.npy hold\(s\) 1 NaN/inf rest value\(s\)"):
        cache.lookup(0, every)
    logp = out / "e0000-s00000.head.npy"
    logp.write_bytes(logp.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"head\.npy is truncated or damaged.*--overwrite"):
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
    ckpt["visdistill"].pop("state_sha256", None)  # as if training had written the NaN
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


# ----------------------------------------------------------------------- run folders
def _fixed_folder_config(root, name="r.yaml", data=None, **trainer):
    """The tiny CLI config with the shipped configs' logger: one fixed folder, runs/tiny."""
    import yaml

    config = yaml.safe_load(Path(_cli_config(root)).read_text())
    config["data"]["init_args"].update(data or {})
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(root / "runs"), "name": "tiny", "version": ""},
    }
    config["trainer"] = {**config["trainer"], "logger": logger, "limit_train_batches": 1}
    config["trainer"].update(trainer)
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_second_run_into_the_same_folder_is_refused_unless_told(tmp_path, capsys):
    """Before: the second run silently replaced the first run's best.ckpt."""
    cfg = _fixed_folder_config(tmp_path)
    folder = tmp_path / "runs" / "tiny"
    main(["fit", "--config", cfg])
    best = (folder / "checkpoints" / "best.ckpt").read_bytes()
    err = _run(["fit", "--config", cfg, "--model.ce_weight", "0.5"], capsys)
    assert f"run folder {folder} already holds another run (" in err and "best.ckpt" in err
    assert "--ckpt_path last" in err and "--run_folder new_version" in err
    assert (folder / "checkpoints" / "best.ckpt").read_bytes() == best
    # A new version below the folder; the first run's files stay as they were.
    with pytest.warns(UserWarning, match="this run logs to .*version_1"):
        main(["fit", "--config", cfg, "--run_folder", "new_version"])
    assert (folder / "version_1" / "checkpoints" / "best.ckpt").is_file()
    assert (folder / "checkpoints" / "best.ckpt").read_bytes() == best
    # Resuming continues in the resumed checkpoint's own folder (no flag needed).
    main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    v1 = torch.load(folder / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert v1["epoch"] == 1 and (folder / "checkpoints" / "best.ckpt").read_bytes() == best
    with pytest.warns(UserWarning, match="--run_folder overwrite: writing into"):
        main(["fit", "--config", cfg, "--run_folder", "overwrite"])


def test_a_run_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    """Before: two concurrent runs both exited 0, one run's checkpoints were gone."""
    import signal
    import subprocess
    import sys

    cfg = _fixed_folder_config(tmp_path)
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(  # another run holding the folder (the lock protocol, no torch)
        [sys.executable, "-c", (
            "import fcntl, json, os, socket, sys, time\n"
            f"fd = os.open({str(folder / '.visdistill.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),"
            " 'started': 'now'}).encode())\n"
            "print('locked', flush=True)\ntime.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _run(["fit", "--config", cfg], capsys)
        assert f"run folder {folder} is in use by another run (pid {holder.pid} on" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # What a kill during a checkpoint write leaves (and a file of the user's).
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / ".last.ckpt.k2j4_x9a.tmp").write_bytes(b"half a checkpoint")
    (folder / "checkpoints" / ".mine.tmp").write_text("not ours")
    main(["fit", "--config", cfg])  # the killed run's lock is stale: taken over
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert not (folder / "checkpoints" / ".last.ckpt.k2j4_x9a.tmp").exists()
    assert (folder / "checkpoints" / ".mine.tmp").read_text() == "not ours"
    assert (folder / ".visdistill.lock").read_text() == ""  # released at the end


def test_an_unwritable_save_dir_is_refused_before_any_work(tmp_path, capsys):
    """Before: a traceback from the logger or checkpoint writer after the model and data
    were built (or, for a read-only folder, at the first checkpoint)."""
    import os

    cfg = _fixed_folder_config(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(blocker / "runs", "Not a directory")]
    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        cases.append((read_only, "Permission denied"))
    for save_dir, reason in cases:
        args = ["fit", "--config", cfg, "--trainer.logger.init_args.save_dir", str(save_dir)]
        err = _run(args, capsys)
        assert f"cannot write to the run folder {save_dir / 'tiny'}: {reason}" in err
        assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------- checkpoint files
@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """`visdistill fit` of the tiny config for one step: (root, config, last.ckpt)."""
    root = tmp_path_factory.mktemp("one")
    cfg = _cli_config(root)
    main(["fit", "--config", cfg, "--trainer.limit_train_batches=1"])
    (last,) = (root / "runs").rglob("last.ckpt")
    return root, cfg, last


def test_checkpoints_are_written_beside_the_target_and_flushed(tmp_path, monkeypatch):
    """Before: Lightning's fsspec transaction wrote the temporary file to the system temp
    folder and moved it (a copy when that is another file system: a kill left a 0-byte
    last.ckpt and an orphaned temp file), without fsync."""
    import os
    import tempfile

    import lightning as L

    temps, synced = [], []
    mkstemp, fsync = tempfile.mkstemp, os.fsync

    def recording_mkstemp(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        temps.append(Path(name))
        return fd, name

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self") else fd)
        return fsync(fd)

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_module(), DigitsDataModule(**DATA))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert temps and all(t.parent == ckpt.parent for t in temps)  # same folder: a rename
    assert any(str(t) in map(str, synced) for t in temps)  # flushed before the rename
    assert not list(ckpt.parent.glob(".*.tmp"))


def test_ckpt_path_last_skips_empty_and_corrupted_checkpoints_and_says_why(one_run, capsys):
    """Before: the newest last.ckpt was taken even when empty or corrupt: a traceback (or,
    corrupt but readable, a silently wrong resume)."""
    import os
    import time

    root, cfg, good = one_run
    logs = good.parent.parent.parent  # runs/lightning_logs
    empty = logs / "version_7" / "checkpoints" / "last.ckpt"
    flipped = logs / "version_8" / "checkpoints" / "last.ckpt"
    empty.parent.mkdir(parents=True)
    flipped.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    ckpt = torch.load(good, weights_only=True)
    moment = ckpt["optimizer_states"][0]["state"][0]["exp_avg"]  # may be channels_last
    moment[(0,) * moment.ndim] = 8e6  # a bit flip
    torch.save(ckpt, flipped)
    now = time.time()
    os.utime(empty, (now + 10, now + 10))  # the newest
    os.utime(flipped, (now + 5, now + 5))
    args = ["fit", "--config", cfg, "--trainer.limit_train_batches=1", "--trainer.max_epochs=2"]
    with pytest.warns(UserWarning, match="skipped newer unusable checkpoint") as record:
        main([*args, "--ckpt_path", "last"])
    message = next(str(w.message) for w in record if "skipped newer" in str(w.message))
    assert f"resuming from {good}" in message
    assert f"{empty} (empty file (0 bytes): its write was interrupted)" in message
    assert f"{flipped} (corrupted: its tensors do not match the sha256" in message
    # Given directly, each is one clear line.
    err = _run([*args, "--ckpt_path", str(empty)], capsys)
    assert f"checkpoint {empty} is an empty file (0 bytes)" in err and "zip" not in err
    err = _run([*args, "--ckpt_path", str(flipped)], capsys)
    assert f"{flipped} is corrupted: its tensors do not match the sha256 stored" in err


def test_bit_flips_in_a_checkpoint_file_are_refused(one_run, tmp_path):
    """Before: 4 KB flipped inside a tensor's bytes loaded without a word (an optimizer
    state of 8e6, training went on)."""
    import zipfile

    import lightning as L

    _, _, good = one_run
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:  # the largest tensor record, where the bytes are
        info = max(zf.infolist(), key=lambda i: i.file_size)
    local = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
    start += int.from_bytes(local[28:30], "little") + info.file_size // 2
    data[start : start + 4096] = bytes(b ^ 0xFF for b in data[start : start + 4096])
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    trainer = L.Trainer(max_epochs=2, logger=False, accelerator="cpu", default_root_dir=tmp_path)
    module = DistillationModule(
        student=ModelConfig(**TEST_RESNET),
        teachers=[ModelConfig(name="test_vit", num_classes=10,
                              model_kwargs=dict(img_size=32, patch_size=8))],
        terms=[KD(temperature=2.0)],
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="is corrupted: its tensors do not match"):
        trainer.fit(module, DigitsDataModule(**DATA), ckpt_path=bad, weights_only=True)
    with pytest.raises(CheckpointError, match="is corrupted: its tensors do not match"):
        export_student(bad, tmp_path / "export")


# ----------------------------------------------------------------------- resume records
def test_resume_into_a_new_version_keeps_the_runs_best_checkpoint(tmp_path):
    """Before: after a resume into a new logger version Lightning forgot the best score, the
    first validation after the resume became the "best", and test_after_fit tested that
    instead of the run's best checkpoint."""
    from visdistill.cli import lightning_main

    cfg = _cli_config(tmp_path)
    args = ["fit", "--config", cfg, "--trainer.limit_train_batches=1"]
    main(args)
    (first_best,) = (tmp_path / "runs").rglob("best.ckpt")
    last = first_best.parent / "last.ckpt"
    # The run's best so far scored 1.0 (no later epoch can beat it): edit the record.
    ckpt = torch.load(last, weights_only=True)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'val/acc'")]
    ckpt["callbacks"][key]["best_model_score"] = torch.tensor(1.0)
    ckpt["callbacks"][key]["best_k_models"] = {str(first_best): torch.tensor(1.0)}
    ckpt["visdistill"].pop("state_sha256", None)  # edited on purpose
    torch.save(ckpt, last)
    cli = lightning_main([*args, "--ckpt_path", "last", "--trainer.max_epochs", "3"])
    best = cli.trainer.checkpoint_callback
    assert best.best_model_path == str(first_best) and float(best.best_model_score) == 1.0
    assert list((tmp_path / "runs").rglob("best.ckpt")) == [first_best]  # no new "best"


def test_resuming_with_other_teachers_names_both(tmp_path):
    """Before: "trained with other teacher weights ...: a teacher file or zoo entry changed"."""
    from safetensors.torch import save_file

    from visdistill import resume
    from visdistill.models import Backbone

    vit = dict(name="test_vit", num_classes=10, model_kwargs=dict(img_size=32, patch_size=8))
    configs = []
    for cfg in (TEST_RESNET, vit):
        path = tmp_path / f"{cfg['name']}.safetensors"
        save_file(Backbone.from_config(ModelConfig(**cfg)).model.state_dict(), str(path))
        configs.append(ModelConfig(**cfg, checkpoint=str(path)))

    def build(teacher):
        return DistillationModule(ModelConfig(**TEST_RESNET), [teacher], [KD()])

    module = build(configs[0])
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    resume.on_save(module, checkpoint)
    with pytest.raises(
        CheckpointError,
        match=r"run\.ckpt: the checkpoint's teachers are \[test_resnet\], the config's "
        r"\[test_vit\]",
    ):
        resume.on_load(build(configs[1]), checkpoint, "run.ckpt")


# ----------------------------------------------------------------------- crash safety
class SigkillAt(Callback):
    """SIGKILLs its own process at the ``n``-th event ``phase`` of this process: a training
    batch start, inside a step (after backward, before the update) or a validation batch."""

    def __init__(self, phase: str, n: int) -> None:
        self.phase, self.n, self.seen = phase, n, 0

    def _tick(self, phase: str) -> None:
        if phase == self.phase:
            self.seen += 1
            if self.seen == self.n:
                os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, *args) -> None:
        self._tick("batch_start")

    def on_before_optimizer_step(self, *args) -> None:
        self._tick("step")

    def on_validation_batch_start(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self._tick("validation")


def _fit_child(args: list[str], phase: str | None, n: int) -> None:
    """A forked process running `visdistill fit`; checkpoint-write kills patch torch.save:
    killed with half the temporary file written, or with all of it before the rename."""
    try:
        torch.set_num_threads(1)
        if phase in ("mid_write", "before_rename"):
            real, count = torch.save, [0]

            def save(obj, f, *a, **kw):
                if isinstance(f, (str, os.PathLike)) and str(f).endswith(".tmp"):
                    count[0] += 1
                    if count[0] == n:
                        real(obj, f, *a, **kw)
                        if phase == "mid_write":
                            os.truncate(f, os.path.getsize(f) // 2)
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(obj, f, *a, **kw)

            torch.save = save
        elif phase is not None:
            args = [*args, "--trainer.callbacks+=test_data_safety.SigkillAt",
                    f"--trainer.callbacks.phase={phase}", f"--trainer.callbacks.n={n}"]  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main(args)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _run_child(args: list[str], phase: str | None = None, n: int = 0) -> int:
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_fit_child, args=(args, phase, n))
    child.start()
    child.join()
    return child.exitcode


def _crash_args(root: Path, data: dict | None) -> list[str]:
    """`fit` of 3 epochs of 3 steps, last.ckpt every step, always `--ckpt_path last`."""
    limit = None if data else 3  # whole epochs of 48 images, or the first 3 batches of each
    cfg = _fixed_folder_config(root, data=data, limit_train_batches=limit, max_epochs=3)
    return ["fit", "--config", cfg, "--checkpoint_every_n_steps=1", "--ckpt_path=last"]


def _reference(tmp_path: Path, args) -> dict[str, torch.Tensor]:
    (tmp_path / "ref").mkdir()
    assert _run_child(args(tmp_path / "ref")) == 0
    return _student(tmp_path / "ref" / "runs" / "tiny" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(
    ("data", "kills"),
    [(None, [("validation", 1)]), (DATA, [("validation", 2), ("batch_start", 2)])],
    ids=["limit_train_batches", "second_resume"],
)
def test_resume_from_a_checkpoint_after_an_epochs_last_batch_is_exact(tmp_path, data, kills):
    """Before: (limit_train_batches) the loader skipped the next epoch's first batches; (a
    second resume) Lightning 2.6 left the epoch after such a resume unmarked as started, so
    its checkpoints resumed as "epoch finished" and replayed it. Both ended with other
    weights than the uninterrupted run's."""
    args = functools.partial(_crash_args, data=data)
    reference = _reference(tmp_path, args)
    root = tmp_path / "killed"
    root.mkdir()
    for phase, n in kills:
        assert _run_child(args(root), phase, n) == -signal.SIGKILL
    assert _run_child(args(root)) == 0
    final = _student(root / "runs" / "tiny" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    """SIGKILL at >= 20 random points (batch starts, inside steps, validation, halfway
    through a checkpoint's temporary file, before its rename), `fit --ckpt_path last` after
    each: every last.ckpt left behind is usable, and the final student equals an
    uninterrupted run's, bit for bit. (Measured: see docs/errors.md.)"""
    import random

    from visdistill.resume import checkpoint_problem

    args = functools.partial(_crash_args, data=None)  # 3 epochs of 3 (limited) steps
    reference = _reference(tmp_path, args)
    rng = random.Random(16)
    phases = ["batch_start", "step", "validation", "mid_write", "before_rename"]
    kills, rounds, log = 0, 0, []
    while kills < 20:
        rounds += 1
        root = tmp_path / f"round{rounds}"
        root.mkdir()
        folder = root / "runs" / "tiny" / "checkpoints"
        while True:
            phase, n = rng.choice(phases), rng.randint(1, 2)
            code = _run_child(args(root), phase, n)
            log.append((rounds, phase, n, code))
            if code == 0:
                break
            assert code == -signal.SIGKILL, log
            kills += 1
            unusable = {p: checkpoint_problem(p) for p in folder.glob("last*.ckpt")}
            assert not any(unusable.values()), (log, unusable)
        assert not list(folder.glob(".*.tmp"))  # a killed write's temporary is removed
        final = _student(folder / "last.ckpt")
        assert final.keys() == reference.keys(), log
        assert all(torch.equal(final[k], reference[k]) for k in final), log
    print(f"{kills} kills in {rounds} round(s): {log}")


def _cache_child(out: Path, epochs: int, overwrite: bool, phase: str | None, n: int) -> None:
    """A forked `build_teacher_cache`, SIGKILLed at its ``n``-th teacher batch ("teachers")
    or just before the ``n``-th rename into ``out`` ("move")."""
    try:
        torch.set_num_threads(1)
        from visdistill.teachers import TeacherEnsemble

        count = [0]

        def tick(kind: str) -> None:
            if phase == kind:
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)

        forward, replace = TeacherEnsemble.forward, os.replace
        TeacherEnsemble.forward = lambda self, *a, **k: (tick("teachers"), forward(self, *a, **k))[
            1
        ]
        os.replace = lambda src, dst: (tick("move") if Path(dst).parent == out or Path(dst) == out else None, replace(src, dst))[1]  # fmt: skip
        build_teacher_cache(_module(), _data(), out, epochs, batch_size=8, progress=False,
                            overwrite=overwrite)  # fmt: skip
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _build_child(out: Path, epochs: int, overwrite: bool, phase=None, n: int = 0) -> int:
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=_cache_child, args=(out, epochs, overwrite, phase, n)
    )
    child.start()
    child.join()
    return child.exitcode


def _cache_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sigkill_during_cache_builds_never_leaves_a_mixed_cache(tmp_path):
    """SIGKILL during the teachers' passes and just before each rename of a first build and
    of an --overwrite build: `--out` is always absent, the previous cache whole, or (killed
    between the file moves of an overwrite) manifest-less, which opening refuses; never a
    manifest over another build's arrays. The rebuild equals an uninterrupted build byte for
    byte, and no killed build's temporary folder is left behind."""
    reference = {}
    for epochs in (1, 2):
        ref = tmp_path / f"ref{epochs}"
        assert _build_child(ref, epochs, False) == 0
        reference[epochs] = _cache_bytes(ref)
    out, log = tmp_path / "cache", []
    # 6 teacher batches per epoch (48 images of 8); a first build renames its folder once,
    # an overwrite moves each file (one per epoch, then the manifest).
    first = [("teachers", 2), ("teachers", 6), ("move", 1)]
    again = [("teachers", 1), ("teachers", 9), ("move", 1), ("move", 2), ("move", 3)]
    for epochs, overwrite, previous, kills in ((1, False, None, first), (2, True, 1, again)):
        for phase, n in kills:
            code = _build_child(out, epochs, overwrite, phase, n)
            log.append((epochs, phase, n, code))
            assert code == -signal.SIGKILL, log
            if not out.exists():
                assert previous is None, log
            elif (out / "manifest.json").exists():
                assert _cache_bytes(out) == reference[previous], log  # the old cache, whole
            else:
                with pytest.raises(ConfigError):
                    TeacherCache.open(out)
        assert _build_child(out, epochs, overwrite) == 0, log
        assert _cache_bytes(out) == reference[epochs], log
        assert not list(tmp_path.glob(".cache.building*")), log  # killed builds finished
    print(f"{len(log)} kills: {log}")
