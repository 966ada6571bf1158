"""Kill and resume: a fit stopped mid-epoch and resumed from its checkpoint ends with the
uninterrupted run's weights, bit for bit, including every term's state."""

import contextlib
import functools
import warnings

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from visdistill import (
    KD,
    ND,
    DigitsDataModule,
    DistillationModule,
    ModelConfig,
    export_student,
)
from visdistill.cli import lightning_main, main
from visdistill.data.replay import EpochSampler, epoch_sampler
from visdistill.data.resumable import ResumableDataLoader
from visdistill.errors import CheckpointError
from visdistill.loader_pass import stop_workers
from visdistill.models import Backbone
from visdistill.teacher_cache import build_teacher_cache
from visdistill.terms import MEALV2, UNIC, MSTRouting

# timm's test models (0.3 M parameters): a CNN and a ViT at 32 px.
CNN = dict(name="test_resnet", num_classes=10)
VIT = dict(name="test_vit", num_classes=10, model_kwargs=dict(img_size=32, patch_size=8))
# 48 training images in batches of 16: 3 steps per epoch, 6 in the 2-epoch fit.
DATA = dict(batch_size=16, train_subset=48, val_split=32)


class Killed(Exception):
    """Stands in for a crash (or SIGKILL) right after a checkpoint was written."""


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _module(teachers, terms, **kw):
    return DistillationModule(
        student=ModelConfig(**VIT),
        teachers=teachers,
        terms=terms,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        # A step-level schedule: its position is part of what must resume.
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
        scheduler_interval="step",
        eval_teachers=False,
        **kw,
    )


def _fit(root, make_module, ckpt_path=None, callbacks=(), seed=0):
    L.seed_everything(seed, verbose=False)
    module = make_module()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Killed):
            trainer.fit(module, DigitsDataModule(**DATA), ckpt_path=ckpt_path, weights_only=True)
    return module, trainer


def _every(root, n):
    return ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=n, save_top_k=-1)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"differ after resume: {different[:10]}"


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """Teachers with weights files: rebuildable, so checkpoints leave them out."""
    root = tmp_path_factory.mktemp("teachers")
    paths = []
    for i, cfg in enumerate((CNN, VIT)):
        torch.manual_seed(10 + i)
        model = ModelConfig(**cfg)
        path = root / f"t{i}.safetensors"
        save_file(Backbone.from_config(model).model.state_dict(), str(path))
        paths.append(ModelConfig(**cfg, checkpoint=str(path)))
    return paths


def test_kill_mid_epoch_and_resume_is_bitwise_exact_with_unic_nd_meal_v2(tmp_path, teacher_files):
    def make():
        # UNIC's teacher dropping and ND's projector dropout draw from the global RNG.
        terms = [UNIC(drop_prob=0.5), ND(cache_dir=""), MEALV2(), KD()]
        return _module(teacher_files, terms)

    reference, _ = _fit(tmp_path / "ref", make)
    # Killed at step 4: epoch 1, after 1 of its 3 batches; the checkpoint is from step 4.
    _fit(tmp_path / "run", make, callbacks=[_every(tmp_path / "run", 2), KillAt(4)])
    ckpt = tmp_path / "run" / "step=4.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("teachers.") for k in saved["state_dict"])  # rebuilt on load
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 1
    # Another seed for the resumed process: order and RNG come from the checkpoint.
    resumed, trainer = _fit(tmp_path / "run", make, ckpt_path=ckpt, seed=123)
    assert trainer.global_step == 6
    _assert_same_state(reference, resumed)
    # Without the teachers in it, the checkpoint still exports and loads (teachers rebuilt).
    out = export_student(ckpt, tmp_path / "export")
    assert (out / "model.safetensors").is_file()
    # The terms' arguments are in the hyper-parameters: load_from_checkpoint rebuilds them.
    loaded = DistillationModule.load_from_checkpoint(ckpt, weights_only=True)
    assert [type(t).__name__ for t in loaded.terms] == ["UNIC", "ND", "MEALV2", "KD"]
    term_keys = [k for k in saved["state_dict"] if k.startswith("terms.")]
    assert term_keys and all(
        torch.equal(loaded.state_dict()[k], saved["state_dict"][k]) for k in term_keys
    )
    teacher = Backbone.from_config(teacher_files[0]).state_dict()
    assert all(torch.equal(v, loaded.teachers[0].state_dict()[k]) for k, v in teacher.items())
    unic, nd, meal = resumed.terms[:3]
    assert not torch.equal(unic.cls_stats[0].mean, torch.zeros_like(unic.cls_stats[0].mean))
    assert bool(nd.means_ready) and meal.discriminator is not None


def test_resume_with_teacher_cache_and_mst_router_is_exact_mid_epoch_and_at_epoch_end(tmp_path):
    teachers = [ModelConfig(**CNN), ModelConfig(**VIT)]  # random init: kept in checkpoints
    cache_dir = tmp_path / "cache"
    torch.manual_seed(0)
    module = _module(teachers, [KD()])
    dm = DigitsDataModule(**DATA)
    dm.setup("fit")
    build_teacher_cache(module, dm, cache_dir, epochs=2, top_k=10, progress=False)

    def make():
        torch.manual_seed(0)  # the same random teachers as the cache's
        terms = [MSTRouting(top_k=1, mode="soft_mixture"), KD()]
        return _module(teachers, terms, teacher_cache=str(cache_dir))

    root = tmp_path / "ref"
    reference, _ = _fit(root, make, callbacks=[_every(root, 1)])
    saved = torch.load(root / "step=2.ckpt", weights_only=True)
    assert any(k.startswith("teachers.") for k in saved["state_dict"])
    # step 2: mid-epoch 0; step 3: after the last batch of epoch 0.
    for step in (2, 3):
        resumed, _ = _fit(tmp_path / f"from{step}", make, ckpt_path=root / f"step={step}.ckpt")
        _assert_same_state(reference, resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_skips_the_batches_already_done(workers):
    data = torch.arange(20).float()
    kw = dict(batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    loader = ResumableDataLoader(data, sampler=EpochSampler(20, epoch_keys=False), **kw)
    loader.sampler.set_epoch(3)
    full = list(loader)
    loader.sampler.set_epoch(3)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"batches": 2, "epoch": 3, "seed": 0, "num_batches": 5, "batch_size": 4}
    fresh = ResumableDataLoader(data, sampler=EpochSampler(20, seed=9, epoch_keys=False), **kw)
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(fresh) == 5 and len(rest) == 3  # full length for Lightning, 3 batches left
    assert all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))
    assert fresh.state_dict()["batches"] == 5
    fresh.sampler.set_epoch(3)
    again = list(fresh)  # the skip applies to the resumed epoch only
    assert len(again) == 5 and all(torch.equal(a, b) for a, b in zip(again, full, strict=True))
    for used in (loader, fresh):  # persistent workers: stop them now, not at a 20 s gc join
        stop_workers(used)


def test_loader_state_from_other_data_is_refused():
    loader = ResumableDataLoader(torch.zeros(20), batch_size=4, sampler=EpochSampler(20))
    state = {"batches": 2, "epoch": 0, "seed": 0, "num_batches": 5, "batch_size": 8}
    with pytest.raises(CheckpointError, match="batch_size=8, this run's has 4"):
        loader.load_state_dict(state)


def test_sharded_sampler_ranks_make_up_the_single_process_batches():
    single = epoch_sampler(10, seed=3)
    ranks = [epoch_sampler(10, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(1)
    order = [i for _, i in single]
    shards = [[i for _, i in s] for s in ranks]
    assert all(isinstance(s, torch.utils.data.DistributedSampler) for s in ranks)
    assert len(ranks[0]) == 5 and shards[0] == order[0::2] and shards[1] == order[1::2]
    # batch t of 2 per rank == single-process batch t of 4
    assert set(shards[0][:2] + shards[1][:2]) == set(order[:4])
    odd = [epoch_sampler(5, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(list(s)) for s in odd] == [3, 3]  # padded, as DistributedSampler


# ---------------------------------------------------------------------------- the CLI
TINY = {
    "student": {"name": "test_resnet", "num_classes": 10},
    "teachers": [{"name": "test_vit", "num_classes": 10, "model_kwargs": VIT["model_kwargs"]}],
    "terms": [{"class_path": "visdistill.KD", "init_args": {"temperature": 2.0}}],
}


def _cli_config(root):
    from test_cli import CONFIG

    config = {**CONFIG, "model": TINY}
    config["trainer"] = {**CONFIG["trainer"], "default_root_dir": str(root / "runs")}
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _student(ckpt):
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.fixture(scope="module")
def killed_cli_run(tmp_path_factory):
    """`visdistill fit` for 2 epochs of 2 steps, killed at step 3 (mid-epoch 1), writing
    last.ckpt every step."""
    root = tmp_path_factory.mktemp("cli")
    cfg = _cli_config(root)
    kill = ["--trainer.callbacks+=test_resume.KillAt", "--trainer.callbacks.step=3"]
    with pytest.raises(Killed):
        main(
            ["fit", "--config", cfg, "--trainer.max_epochs=2", "--checkpoint_every_n_steps=1"]
            + kill
        )
    (ckpt,) = (root / "runs").rglob("last.ckpt")
    return root, cfg, ckpt


def test_cli_kill_then_ckpt_path_last_resumes_mid_epoch_exactly(killed_cli_run):
    root, cfg, first = killed_cli_run
    saved = torch.load(first, weights_only=True)
    assert saved["global_step"] == 3 and saved["epoch"] == 1  # mid-epoch 1
    # Lightning alone would look in the new version_1/checkpoints and start from scratch.
    main(["fit", "--config", cfg, "--trainer.max_epochs=2", "--ckpt_path=last"])
    resumed = root / "runs" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert first.parent.parent.name == "version_0" and resumed.is_file()
    assert torch.load(resumed, weights_only=True)["global_step"] == 4
    other = root / "uninterrupted"
    other.mkdir()
    main(["fit", "--config", _cli_config(other), "--trainer.max_epochs=2"])
    (straight,) = (other / "runs").rglob("last.ckpt")
    a, b = _student(resumed), _student(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cli_bad_resume_checkpoints_are_one_clear_line(killed_cli_run, tmp_path, capsys):
    from test_hostile_input import _run

    _, cfg, ckpt = killed_cli_run
    missing = tmp_path / "nope.ckpt"
    err = _run(["fit", "--config", cfg, "--ckpt_path", str(missing)], capsys)
    assert f"checkpoint not found: {missing}" in err
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    err = _run(["fit", "--config", cfg, "--ckpt_path", str(truncated)], capsys)
    assert f"cannot read checkpoint {truncated}" in err
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _Evil()}, evil)
    err = _run(["fit", "--config", cfg, "--ckpt_path", str(evil)], capsys)
    assert "pickled objects" in err and "pwned" not in capsys.readouterr().out
    # Other terms than the checkpoint's: named, not a torch key dump. (The config is what
    # runs: LightningCLI's overwrite of the model config from a checkpoint file is off.)
    args = ["fit", "--config", cfg, "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2"]
    terms = '[{"class_path": "visdistill.KD"}, {"class_path": "visdistill.MEALV2"}]'
    err = _run([*args, "--model.terms", terms], capsys)
    assert "was written by another configuration (terms: checkpoint ['KD'], config" in err
    assert "unexpected keys" not in err and "missing keys: terms.1.discriminator" in err
    other_student = '{"name": "test_convnext", "num_classes": 10}'
    err = _run([*args, "--model.student", other_student], capsys)
    assert "student: checkpoint test_resnet, config test_convnext" in err


def test_cli_resume_with_other_term_settings_warns_and_runs_the_config(killed_cli_run, tmp_path):
    _, cfg, ckpt = killed_cli_run
    args = ["fit", "--config", cfg, "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    terms = '[{"class_path": "visdistill.KD", "init_args": {"temperature": 3.0}}]'
    with pytest.warns(UserWarning, match=r"other term settings.*KD\.temperature: 2\.0 -> 3\.0"):
        cli = lightning_main([*args, "--model.terms", terms])
    assert cli.model.terms[0].temperature == 3.0


def test_resuming_another_students_checkpoint_names_both(killed_cli_run, tmp_path):
    _, _, ckpt = killed_cli_run
    module = DistillationModule(
        student=ModelConfig(name="test_convnext", num_classes=10),
        teachers=[ModelConfig(**TINY["teachers"][0])],
        terms=[KD()],
    )
    trainer = L.Trainer(max_epochs=2, logger=False, default_root_dir=tmp_path)
    with pytest.raises(CheckpointError) as e:
        trainer.fit(module, DigitsDataModule(**DATA), ckpt_path=ckpt, weights_only=True)
    assert f"{ckpt} was written by another configuration" in str(e.value)
    assert "student: checkpoint test_resnet, config test_convnext" in str(e.value)


def test_teachers_left_out_of_checkpoints_are_rebuilt_and_a_changed_file_is_refused(
    teacher_files, tmp_path
):
    from visdistill import resume

    def build(teachers):
        torch.manual_seed(0)
        return DistillationModule(ModelConfig(**VIT), teachers, [KD()])

    module = build(teacher_files)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    resume.on_save(module, checkpoint)
    assert not any(k.startswith("teachers.") for k in checkpoint["state_dict"])
    assert len(checkpoint["visdistill"]["teachers_sha256"]) == 64
    resume.on_load(build(teacher_files), checkpoint)  # rebuilt from the files: accepted
    assert all(
        torch.equal(v, checkpoint["state_dict"][f"teachers.{k}"])
        for k, v in module.teachers.state_dict().items()
    )
    # The first teacher's file is overwritten by other weights after training.
    changed = Backbone.from_config(ModelConfig(**CNN)).model.state_dict()
    save_file(changed, str(tmp_path / "changed.safetensors"))
    moved = [ModelConfig(**CNN, checkpoint=str(tmp_path / "changed.safetensors")), teacher_files[1]]
    checkpoint["state_dict"] = {
        k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teachers.")
    }
    with pytest.raises(CheckpointError, match="other teacher weights.*test_resnet, test_vit"):
        resume.on_load(build(moved), checkpoint, "run.ckpt")


def test_cli_ckpt_path_last_without_a_checkpoint_warns_and_starts(tmp_path):
    cfg = _cli_config(tmp_path)
    with pytest.warns(UserWarning, match="--ckpt_path last: no last.ckpt under"):
        main(["fit", "--config", cfg, "--trainer.limit_train_batches=1", "--ckpt_path=last"])
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_resuming_on_other_data_warns_naming_the_differences(tmp_path):
    import warnings

    import lightning as L

    from visdistill import DigitsDataModule, DistillationModule, ModelConfig

    class OtherDigits(DigitsDataModule):
        pass

    def fit(data, epochs, ckpt_path=None):
        module = DistillationModule(student=ModelConfig("resnet10t", num_classes=10))
        trainer = L.Trainer(
            max_epochs=epochs,
            limit_train_batches=2,
            limit_val_batches=1,
            accelerator="cpu",
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, data, ckpt_path=ckpt_path)
        return [str(w.message) for w in caught if "resuming on other data" in str(w.message)]

    assert fit(DigitsDataModule(batch_size=8), 1) == []
    ckpt = str(next(tmp_path.rglob("*.ckpt")))
    assert fit(DigitsDataModule(batch_size=8), 2, ckpt) == []  # same data: quiet
    (seed,) = fit(DigitsDataModule(batch_size=8, seed=1, num_workers=0), 2, ckpt)
    assert "seed: 0 -> 1" in seed and "num_workers" not in seed
    (other,) = fit(OtherDigits(batch_size=8), 2, ckpt)
    assert "data module DigitsDataModule -> OtherDigits" in other
