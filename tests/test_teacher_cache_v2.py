"""The teacher cache built from the data module's own training loader: exact for every
replayable augmentation (crop+flip, timm RandomResizedCrop/RandAugment/erasing, mixup and
CutMix), with pooled features and stage maps for feature terms, the same bytes from one or
two builder processes, resumable after a kill, and refusing runs it was not built for."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CNN, VIT

from visdistill import (
    KD,
    TRG,
    ConfigError,
    DigitsDataModule,
    DistillationModule,
    ModelConfig,
    teacher_cache,
)
from visdistill.fast_path import leave_fast_path, use_channels_last
from visdistill.teacher_cache import TeacherCache, build_teacher_cache
from visdistill.teacher_source import CachedTeachers
from visdistill.teachers import TeacherEnsemble

DIGITS = dict(batch_size=16, train_subset=96, val_split=32)
MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5)


def _module(terms=None, teachers=(CNN, VIT), student=CNN, **kw) -> DistillationModule:
    torch.manual_seed(0)  # the same random teachers every time
    return DistillationModule(
        student=ModelConfig(**student),
        teachers=[ModelConfig(**t) for t in teachers],
        terms=terms if terms is not None else [KD(temperature=2.0)],
        eval_teachers=False,
        **kw,
    )


def _digits(**kw) -> DigitsDataModule:
    dm = DigitsDataModule(**{**DIGITS, **kw})
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    """80 digits as 32 px RGB PNGs in class folders (an image folder to decode)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("pngs") / "train"
    digits = load_digits()
    for i in range(80):
        img = (digits.images[i] * 255 / 16).astype(np.uint8)
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").resize((32, 32), Image.BILINEAR).save(
            folder / f"{i}.png"
        )
    return root


def _folder(root: Path, **kw):
    from visdistill import ImageFolderDataModule

    dm = ImageFolderDataModule(
        train_dir=str(root), image_size=32, batch_size=16, val_split=16, **kw
    )
    dm.setup("fit")
    return dm


def _worst_differences(module, dm, cache_dir, epochs, stages) -> tuple[float, float, int]:
    """Iterate the data module's real training loader, as a fit does, and compare the live
    teachers on each batch with the cache: the largest top-k log-probability error (where
    the live log-probability is above -8, the range fp16 stores to 2e-3) and the largest
    feature error relative to fp16's rounding; the number of samples compared."""
    cache = TeacherCache.open(cache_dir)
    loader = dm.train_dataloader()
    worst_logp, worst_feature, seen = 0.0, 0.0, 0
    # The teachers in the memory format they have in a fit (and had in the build): in the
    # other one, float32 rounding alone moves small features by several fp16 half-units.
    use_channels_last(module.teachers, torch.device("cpu"), module.channels_last)
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        for batch in loader:
            live = module.teachers(batch["image"], stages=stages, pooled=True)
            read = cache.lookup(batch["epoch"], batch["index"])
            for out, got in zip(live, read, strict=True):
                if out.logits is not None:
                    logp = out.logits.log_softmax(-1)
                    keep = logp > -8
                    worst_logp = max(worst_logp, float((got.logits - logp)[keep].abs().max()))
                pairs = [(out.pooled, got.pooled)] + [
                    (out.stages[s], got.stages[s]) for s in out.stages
                ]
                for want, have in pairs:
                    if have is None:
                        continue
                    # fp16 rounds to half a unit in the last place: 2^-11 relative.
                    err = (have - want).abs() / (want.abs() * 2.0**-11 + 6e-8)
                    worst_feature = max(worst_feature, float(err.max()))
            seen += len(batch["index"])
    leave_fast_path(module.teachers)
    return worst_logp, worst_feature, seen


def _shards(root: Path, **kw):
    """The PNG folder converted to LitData shards (once), trained from with timm's options."""
    from visdistill import ShardsDataModule
    from visdistill.data import convert_image_folder

    out = root.parent / "shards"
    if not out.exists():
        convert_image_folder(root, out, num_workers=1, progress=False)
    dm = ShardsDataModule(str(out), image_size=32, batch_size=16, val_split=16, replay=True, **kw)
    dm.setup("fit")
    return dm


AUGMENTATIONS = {
    "crop_flip": lambda root: _digits(),
    "crop_flip_mixup_cutmix": lambda root: _digits(**MIX),
    "timm_rrc_randaugment_erasing": lambda root: _folder(
        root, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", re_prob=0.5
    ),
    "timm_with_mixup_cutmix": lambda root: _folder(
        root, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", re_prob=0.25, **MIX
    ),
    "shards_timm_with_mixup_cutmix": lambda root: _shards(
        root, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", re_prob=0.25, **MIX
    ),
}


@pytest.mark.parametrize("kind", list(AUGMENTATIONS))
def test_cached_outputs_equal_live_teachers_on_the_training_loader_s_images(
    kind, png_folder, tmp_path
):
    L.seed_everything(0)  # the shuffle seed fixes the batches mixup mixes
    module, dm = _module(), AUGMENTATIONS[kind](png_folder)
    stages = [(3,), (1,)]
    out = build_teacher_cache(
        module, dm, tmp_path / "c", epochs=2, top_k=10, pooled=True, stages=[[3], [1]],
        progress=False, shard_size=32,
    )  # fmt: skip
    manifest = TeacherCache.open(out).manifest
    assert manifest["shards_per_epoch"] > 1 and manifest["stages"] == [[3], [1]]
    logp, feature, seen = _worst_differences(module, dm, out, 2, stages)
    assert seen >= 2 * 64
    assert logp <= 2e-3, logp
    assert feature <= 1.01, feature  # within fp16's rounding (plus float32 noise)


def _losses(module, dm, tmp_path, steps=20, epochs=4) -> list[float]:
    losses = []
    original = module.compute_losses

    def record(batch):
        total, parts, student = original(batch)
        losses.append(total.detach().item())
        return total, parts, student

    module.compute_losses = record
    trainer = L.Trainer(
        max_epochs=epochs, max_steps=steps, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    return losses


def _cached_vs_live(tmp_path, monkeypatch, terms, data, epochs, **build):
    """Losses of the first 20 steps of a live fit and of a fit from a cache built first.

    The student is a ViT: a BatchNorm CNN student at batch 16 is chaotic enough that two fits
    whose targets differ by float32 rounding alone (a log_softmax of log-probabilities
    instead of logits, 1e-7) part by 1e-2 within 20 steps, with Adam or SGD; a LayerNorm
    student keeps them within 1e-4 (measured), so the comparison sees the cache."""
    student = {"student": VIT}
    L.seed_everything(0)
    cache = build_teacher_cache(
        _module(terms(), **student),
        data(),
        tmp_path / "cache",
        epochs=epochs,
        progress=False,
        **build,
    )
    L.seed_everything(0)
    live = _losses(_module(terms(), **student), data(), tmp_path, epochs=epochs)
    L.seed_everything(0)
    cached_module = _module(terms(), teacher_cache=str(cache), **student)
    with monkeypatch.context() as m:
        m.setattr(TeacherEnsemble, "forward", _no_teachers)
        cached = _losses(cached_module, data(), tmp_path, epochs=epochs)
    return live, cached


def _no_teachers(*a, **k):
    raise AssertionError("a teacher ran during cached training")


def test_first_20_steps_of_a_cached_kd_fit_equal_the_live_fit(tmp_path, monkeypatch):
    live, cached = _cached_vs_live(
        tmp_path, monkeypatch, lambda: [KD(temperature=2.0)], lambda: DigitsDataModule(**DIGITS), 4
    )
    assert len(live) == len(cached) == 20
    assert max(abs(a - b) for a, b in zip(live, cached, strict=True)) < 1e-3, (live, cached)


def test_first_20_steps_of_a_cached_feature_term_fit_equal_the_live_fit(tmp_path, monkeypatch):
    """TRG reads the teachers' last stage maps: served from the cache's fp16 maps."""
    live, cached = _cached_vs_live(
        tmp_path, monkeypatch,
        lambda: [KD(temperature=2.0), TRG(teacher_stage=-1, grid=2, tokens_per_image=4, k=4)],
        lambda: DigitsDataModule(**DIGITS), 4,
    )  # fmt: skip
    assert len(live) == len(cached) == 20
    assert max(abs(a - b) for a, b in zip(live, cached, strict=True)) < 1e-3, (live, cached)


def test_first_20_steps_of_a_cached_mixup_fit_equal_the_live_fit(tmp_path, monkeypatch):
    live, cached = _cached_vs_live(
        tmp_path, monkeypatch, lambda: [KD(temperature=2.0)],
        lambda: DigitsDataModule(**DIGITS, **MIX), 4,
    )  # fmt: skip
    assert len(live) == len(cached) == 20
    assert max(abs(a - b) for a, b in zip(live, cached, strict=True)) < 1e-3, (live, cached)


# ----------------------------------------------------------------------- sharded, resumable
def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


BUILD = dict(epochs=2, top_k=5, pooled=True, stages=[[3], []], shard_size=32, progress=False)


def _rank_build(rank: int, world: int, store: str, out: str, make=None) -> None:
    """One process of a gloo build; ``make() -> (module, datamodule, options)``."""
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world
        )
        module, dm, options = make() if make else (_module(), _digits(**MIX), BUILD)
        build_teacher_cache(module, dm, out, **options)
        torch.distributed.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_two_process_gloo_build_equals_the_one_process_build(tmp_path):
    one = build_teacher_cache(_module(), _digits(**MIX), tmp_path / "one", **BUILD)
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_rank_build, args=(r, 2, str(tmp_path / "store"), str(tmp_path / "two")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    # manifest + 2 epochs x 3 shards x (head, 2 pooled, 1 stage map)
    assert len(_hashes(one)) == 1 + 2 * 3 * 4
    assert _hashes(tmp_path / "two") == _hashes(one)


def _failing_on_rank_1():
    if torch.distributed.get_rank() == 1:

        def full_disk(self, *args, **kwargs):
            raise OSError(28, "No space left on device (simulated)")

        teacher_cache._ShardWriter.run = full_disk
    return _module(), _digits(**MIX), BUILD


def test_a_failed_process_stops_every_process_of_a_sharded_build(tmp_path, capfd):
    """Before: rank 0 waited for the failed rank 1 at the next barrier until the process
    group's timeout (30 min for gloo) under any launcher that does not stop the others."""
    ctx = multiprocessing.get_context("fork")
    args = (str(tmp_path / "store"), str(tmp_path / "c"), _failing_on_rank_1)
    procs = [ctx.Process(target=_rank_build, args=(r, 2, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill() if p.is_alive() else None
    assert not hung, "a process waited for the failed one"
    assert [p.exitcode for p in procs] == [1, 1]
    err = capfd.readouterr().err
    assert "No space left on device (simulated)" in err  # rank 1's own error
    assert "failed in process(es) [1] while running the teachers" in err  # rank 0's
    assert not (tmp_path / "c").exists()  # nothing half-built in the user's place
    assert any((tmp_path / ".c.building").glob("e0000-s00000.head.npy"))  # rank 0's shard kept


def _killed_build(out: str, n: int, make=None) -> None:
    """Build, SIGKILLed at the ``n``-th teacher forward."""
    try:
        torch.set_num_threads(1)
        count, forward = [0], TeacherEnsemble.forward

        def counted(self, *a, **k):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, *a, **k)

        TeacherEnsemble.forward = counted
        module, dm, options = make() if make else (_module(), _digits(), BUILD)
        build_teacher_cache(module, dm, out, **options)
    except BaseException:
        os._exit(1)
    os._exit(0)


def test_a_killed_build_resumes_from_its_complete_shards_to_the_same_files(tmp_path, monkeypatch):
    reference = build_teacher_cache(_module(), _digits(), tmp_path / "ref", **BUILD)
    out = tmp_path / "c"
    # 6 batches of 16 per epoch, 2 per shard: killed in the 4th batch of epoch 1 (the 10th),
    # after 4 complete shards.
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(str(out), 10))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL and not out.exists()
    building = tmp_path / ".c.building"
    assert len(list(building.glob("*.head.npy"))) == 4
    assert list(building.glob("*.partial"))  # the shard being written when killed
    count, forward = [0], TeacherEnsemble.forward

    def counted(self, *a, **k):
        count[0] += 1
        return forward(self, *a, **k)

    monkeypatch.setattr(TeacherEnsemble, "forward", counted)
    build_teacher_cache(_module(), _digits(), out, **BUILD)
    assert count[0] == 12 - 8  # only the 2 shards not complete were redone
    assert _hashes(out) == _hashes(reference)
    assert not building.exists()
    # A build of something else in the building folder is started over, not mixed in.
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(str(out), 3))
    child.start()
    child.join(300)
    count[0] = 0
    other = build_teacher_cache(_module(), _digits(seed=1), tmp_path / "d", **BUILD)
    assert count[0] == 12 and TeacherCache.open(other).manifest["epochs"] == 2


# ----------------------------------------------------------------------- features, refusals
def test_headless_teachers_cache_features_only_and_feature_terms_read_them(tmp_path):
    headless = dict(CNN, num_classes=0)
    module = _module(terms=[TRG(teacher_stage=-1, grid=2, tokens_per_image=4, k=4)],
                     teachers=(headless,))  # fmt: skip
    dm = _digits()
    with pytest.raises(ConfigError, match="every teacher is headless.*--stages"):
        build_teacher_cache(module, dm, tmp_path / "x", epochs=1, pooled=False, stages=[],
                            progress=False)  # fmt: skip
    out = build_teacher_cache(module, dm, tmp_path / "c", epochs=1, progress=False)
    manifest = TeacherCache.open(out).manifest
    assert manifest["classifiers"] == [] and manifest["stages"] == [[4]]  # the term's -1
    source = CachedTeachers.open(out, module, dm, 1, False, module.teacher_stages)
    batch = torch.utils.data.default_collate([dm.train_set[(0, i)] for i in range(4)])
    (got,) = source.outputs(batch)
    (live,) = module.teachers(batch["image"], stages=[(-1,)])
    assert got.logits is None and set(got.stages) == {-1}  # under the index the term reads
    torch.testing.assert_close(got.stages[-1], live.stages[-1], rtol=1e-3, atol=1e-4)
    with pytest.raises(
        ConfigError, match=r"reads stage 1 of teacher resnet10t.*holds stages \[4\]"
    ):
        CachedTeachers.open(out, module, dm, 1, False, [(1,)])


def test_batching_is_refused_only_when_batches_are_mixed(tmp_path):
    L.seed_everything(0)
    plain = build_teacher_cache(_module(), _digits(), tmp_path / "p", epochs=1, progress=False)
    TeacherCache.open(plain).check(_module(), _digits(batch_size=32), 1)  # any batching
    mixed = build_teacher_cache(_module(), _digits(**MIX), tmp_path / "m", epochs=1,
                                progress=False)  # fmt: skip
    cache = TeacherCache.open(mixed)
    cache.check(_module(), _digits(**MIX), 1)
    with pytest.raises(ConfigError, match="augmentation: cache has .*'batch_size': 16"):
        cache.check(_module(), _digits(**MIX, batch_size=32), 1)
    with pytest.raises(ConfigError, match="augmentation: cache has .*'world_size': 1"):
        cache.check(_module(), _digits(**MIX), 1, world_size=2)
    module = _module()
    L.seed_everything(5)  # another run seed shuffles, so mixes, other batches
    with pytest.raises(ConfigError, match="'shuffle_seed': 0.*'shuffle_seed': 5"):
        cache.check(module, _digits(**MIX), 1)
    # Built for 2 training processes: 96 samples split evenly, checked against 2.
    L.seed_everything(0)
    two = build_teacher_cache(_module(), _digits(**MIX), tmp_path / "w2", epochs=1,
                              train_world_size=2, progress=False)  # fmt: skip
    TeacherCache.open(two).check(_module(), _digits(**MIX), 1, world_size=2)
    with pytest.raises(ConfigError, match="do not split evenly.*divisible by 3"):
        build_teacher_cache(_module(), _digits(**MIX, train_subset=98), tmp_path / "w3",
                            epochs=1, train_world_size=3, progress=False)  # fmt: skip


def test_the_cache_command_takes_the_new_options(tmp_path, capsys):
    from test_cli import CONFIG, _write

    from visdistill.cli import main

    config = _write(tmp_path, {**CONFIG, "trainer": {**CONFIG["trainer"], "max_epochs": 1}})
    out = tmp_path / "cache"
    main(["cache", "--config", config, "--out", str(out), "--pooled", "--stages", "[-1]",
          "--shard_size", "64", "--logits_dtype", "float32"])  # fmt: skip
    assert "teacher cache written" in capsys.readouterr().out
    manifest = TeacherCache.open(out).manifest
    assert manifest["pooled"] and manifest["logits_dtype"] == "float32"
    assert all(len(s) == 1 for s in manifest["stages"]) and manifest["shards_per_epoch"] > 1


# ----------------------------------------------------------------------- real image folder
FOLDER_IMAGES = int(os.environ.get("VISDISTILL_CACHE_FOLDER_IMAGES", "20000"))
VIT64 = dict(VIT, model_kwargs=dict(img_size=64, patch_size=8, depth=2))


def _fashion_folder(root: Path, n: int) -> Path:
    """``n`` Fashion-MNIST training images as 64 px RGB PNGs in class folders, plus the
    scikit-image photos (spread over the classes): real decoding, real photo statistics."""
    from PIL import Image
    from skimage import data as photos

    from visdistill.data.fashion_mnist_folder import write_fashion_mnist_folder

    write_fashion_mnist_folder(root, n, size=64)
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
    for j, name in enumerate(names):
        img = Image.fromarray(getattr(photos, name)()).convert("RGB").resize((64, 64))
        img.save(root / str(j % 10) / f"photo_{name}.png")
    return root


@pytest.mark.slow
def test_cache_checks_on_a_real_png_folder(tmp_path, monkeypatch):
    """The cache checks at scale: a Fashion-MNIST PNG folder (VISDISTILL_CACHE_FOLDER_IMAGES,
    default 20000) plus scikit-image photos at 64 px; cached vs live teachers for timm
    RRC+RandAugment+erasing with and without mixup/CutMix (first 8 batches of each epoch),
    20 cached vs live steps under mixup, and (on a 2048-image subset) the 2-process build and
    the killed build's resume."""
    root = _fashion_folder(tmp_path / "folder", FOLDER_IMAGES)
    teachers = (dict(CNN), VIT64)
    kinds = {
        "timm": dict(scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", re_prob=0.25),
        "timm_mixup_cutmix": dict(scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", **MIX),
    }

    def folder(subset=None, **kw):
        from visdistill import ImageFolderDataModule

        dm = ImageFolderDataModule(
            train_dir=str(root), image_size=64, batch_size=64, val_split=256,
            train_subset=subset, num_workers=2, **kw,
        )  # fmt: skip
        dm.setup("fit")
        return dm

    for kind, options in kinds.items():
        L.seed_everything(0)
        module, dm = _module(teachers=teachers), folder(**options)
        out = build_teacher_cache(module, dm, tmp_path / kind, epochs=2, top_k=10, pooled=True,
                                  stages=[[-1], [-1]], progress=False)  # fmt: skip
        cache, loader = TeacherCache.open(out), dm.train_dataloader()
        for e in range(2):
            loader.sampler.set_epoch(e)
            for t, batch in enumerate(loader):
                if t == 8:
                    break
                live = module.teachers(batch["image"], stages=[(4,), (1,)], pooled=True)
                read = cache.lookup(batch["epoch"], batch["index"])
                for out_, got in zip(live, read, strict=True):
                    logp = out_.logits.log_softmax(-1)
                    keep = logp > -8
                    assert (got.logits - logp)[keep].abs().max() <= 2e-3, (kind, e, t)
                    for s, want in out_.stages.items():
                        torch.testing.assert_close(got.stages[s], want, rtol=1e-3, atol=1e-4)
    (tmp_path / "fit").mkdir()
    live, cached = _cached_vs_live(
        tmp_path / "fit", monkeypatch, lambda: [KD(temperature=2.0)],
        lambda: folder(2048, **kinds["timm_mixup_cutmix"]), 1,
    )  # fmt: skip
    assert len(live) == len(cached) == 20
    assert max(abs(a - b) for a, b in zip(live, cached, strict=True)) < 1e-3

    def make():
        options = dict(epochs=2, pooled=True, stages=[[-1], [-1]], shard_size=512, progress=False)
        return _module(teachers=teachers), folder(2048, **kinds["timm_mixup_cutmix"]), options

    L.seed_everything(0)
    one = build_teacher_cache(*make()[:2], tmp_path / "one", **make()[2])
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_rank_build, args=(r, 2, str(tmp_path / "store"), str(tmp_path / "two"), make))
        for r in range(2)
    ]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(1800)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _hashes(tmp_path / "two") == _hashes(one)
    # 2 epochs x 4 shards of 8 batches: killed in the 20th batch, resumed to the same files.
    child = ctx.Process(target=_killed_build, args=(str(tmp_path / "k"), 20, make))
    child.start()
    child.join(1800)
    assert child.exitcode == -signal.SIGKILL
    assert list((tmp_path / ".k.building").glob("*.head.npy"))  # complete shards kept
    build_teacher_cache(*make()[:2], tmp_path / "k", **make()[2])
    assert _hashes(tmp_path / "k") == _hashes(one)


def test_augmentation_that_cannot_be_replayed_is_refused_with_the_fix(png_folder, tmp_path):
    from visdistill import ImageFolderDataModule

    dm = ImageFolderDataModule(train_dir=str(png_folder), image_size=32, val_split=16, replay=False)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="replay: false.*set data.init_args.replay: true"):
        build_teacher_cache(_module(), dm, tmp_path / "c", epochs=1, progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.building").exists()


def test_opening_reads_no_values_and_damaged_values_are_refused_where_read(tmp_path):
    """Opening checks files, shapes and fields only (a full scan of every epoch's heads is
    tens of gigabytes at ImageNet scale); a NaN log-probability or an out-of-range class is
    refused by the lookup that reads it, naming the file."""
    L.seed_everything(0)
    out = build_teacher_cache(_module(), _digits(), tmp_path / "c", epochs=1, progress=False)
    name = sorted(p.name for p in Path(out).glob("*head*"))[0]
    head = np.load(Path(out) / name, mmap_mode="r+")
    head["logp"][5, 0, 0] = np.nan
    head["classes"][9, 0, 0] = 99
    head.flush()
    del head
    cache = TeacherCache.open(out)  # no value read yet
    epoch = torch.zeros((), dtype=torch.long)
    slot_of = cache._slot_of(0)
    by_slot = {int(slot): i for i, slot in enumerate(slot_of) if slot >= 0}
    clean = torch.tensor([by_slot[s] for s in range(0, 4)])
    assert cache.lookup(epoch, clean)[0].logits.isfinite().all()
    with pytest.raises(ConfigError, match=rf"{name} hold\(s\) 1 NaN/inf logp value"):
        cache.lookup(epoch, torch.tensor([by_slot[5]]))
    with pytest.raises(ConfigError, match=rf"{name} hold\(s\) class 99, outside 0..9"):
        cache.lookup(epoch, torch.tensor([by_slot[9]]))
