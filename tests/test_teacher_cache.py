import lightning as L
import pytest
import torch
from conftest import CNN, VIT

from visdistill import KD, ND, TRG, ConfigError, DigitsDataModule, DistillationModule, ModelConfig
from visdistill.data.replay import EpochSampler, ReplayCropFlip
from visdistill.teacher_cache import TeacherCache, build_teacher_cache
from visdistill.teachers import TeacherEnsemble


def test_replayed_augmentation_is_a_function_of_seed_epoch_and_sample():
    aug = ReplayCropFlip(32, 4, seed=0)
    assert aug.params(3, 17) == ReplayCropFlip(32, 4, seed=0).params(3, 17)
    assert len({aug.params(e, 17) for e in range(20)}) > 5  # varies over epochs
    img = torch.arange(32 * 32, dtype=torch.uint8).view(1, 32, 32)
    top, left, flip = aug.params(0, 5)
    expected = torch.nn.functional.pad(img, (4, 4, 4, 4))[..., top : top + 32, left : left + 32]
    assert torch.equal(aug(img, 0, 5), expected.flip(-1) if flip else expected)


def test_epoch_sampler_shuffles_per_epoch_and_yields_epoch_keys():
    sampler = EpochSampler(10, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(i for _, i in second) == list(range(10)) and first != second
    # Without set_epoch (Lightning's DDP wrapper does not forward it) it counts epochs itself.
    assert {e for e, _ in sampler} == {2}


def _module(**kw):
    torch.manual_seed(0)
    return DistillationModule(
        student=ModelConfig(**CNN),
        teachers=[ModelConfig(**CNN), ModelConfig(**VIT)],
        terms=[KD(temperature=2.0)],
        eval_teachers=False,
        **kw,
    )


def _data(**kw):
    dm = DigitsDataModule(batch_size=64, train_subset=256, val_split=64, **kw)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    return build_teacher_cache(_module(), _data(), out, epochs=2, top_k=10, progress=False)


def test_cached_outputs_equal_live_teachers_on_the_same_crops(cache_dir):
    module, dm = _module(), _data()
    cache = TeacherCache.open(cache_dir)
    keys = [(1, i) for i in range(0, 256, 7)]
    batch = torch.utils.data.default_collate([dm.train_set[k] for k in keys])
    live = module.teachers(batch["image"])
    for out, cached in zip(live, cache.lookup(1, batch["index"]), strict=True):
        assert torch.allclose(cached.logits, out.logits.log_softmax(-1), atol=5e-3)


def test_top_k_keeps_the_largest_and_spreads_the_rest(tmp_path):
    module, dm = _module(), _data()
    out = build_teacher_cache(module, dm, tmp_path / "k3", epochs=1, top_k=3, progress=False)
    cache = TeacherCache.open(out)
    keys = [(0, i) for i in range(8)]
    batch = torch.utils.data.default_collate([dm.train_set[k] for k in keys])
    probs = module.teachers(batch["image"])[0].logits.softmax(-1)
    approx = cache.lookup(0, batch["index"])[0].logits.exp()
    top = probs.topk(3, -1)
    assert torch.allclose(approx.gather(1, top.indices), top.values, atol=2e-3)
    assert torch.allclose(approx.sum(-1), torch.ones(8), atol=5e-3)


def test_a_cache_for_other_teachers_or_augmentation_is_refused(cache_dir):
    cache = TeacherCache.open(cache_dir)
    cache.check(_module(), _data(), max_epochs=2)  # the matching setup passes
    torch.manual_seed(1)
    other = DistillationModule(
        student=ModelConfig(**CNN), teachers=[ModelConfig(**CNN), ModelConfig(**VIT)], terms=[KD()]
    )
    with pytest.raises(ConfigError, match="built for another setup \\(teachers: cache has"):
        cache.check(other, _data(), max_epochs=2)
    with pytest.raises(ConfigError, match="augmentation: cache has"):
        cache.check(_module(), _data(seed=3), max_epochs=2)
    with pytest.raises(ConfigError, match="holds 2 epochs of augmentations but the run trains 5"):
        cache.check(_module(), _data(), max_epochs=5)
    with pytest.raises(ConfigError, match="teacher cache not found"):
        TeacherCache.open(cache_dir.parent / "nope")


def test_terms_that_read_teacher_stages_need_a_cache_that_holds_them(cache_dir):
    # Not built yet: refused (or accepted) when fit opens it.
    DistillationModule(
        student=ModelConfig(**CNN),
        teachers=[ModelConfig(**CNN)],
        terms=[TRG(teacher_stage=-1)],
        teacher_cache="x",
    )
    with pytest.raises(ConfigError, match=r"reads stage -1 of teacher resnet10t, but the "
                       r"teacher cache .* holds no stages of it; rebuild"):  # fmt: skip
        DistillationModule(
            student=ModelConfig(**CNN),
            teachers=[ModelConfig(**CNN), ModelConfig(**VIT)],
            terms=[TRG(teacher_stage=-1)],
            teacher_cache=str(cache_dir),
        )


def _fit(module, tmp_path, epochs=2):  # fit without validation
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, _data())
    return trainer


@pytest.mark.slow  # 50 s; test_teacher_cache_v2 compares 20 steps of cached and live fits
def test_cached_training_never_runs_teachers_and_matches_live_training(tmp_path, monkeypatch):
    def data():
        dm = DigitsDataModule(batch_size=64, train_subset=800, val_split=400)
        dm.setup("fit")
        return dm

    out = build_teacher_cache(_module(), data(), tmp_path / "c", epochs=3, progress=False)

    def fit(**kw):
        L.seed_everything(0)
        module = _module(**kw)
        losses = []
        original = module.compute_losses

        def record(batch):
            total, parts, student = original(batch)
            losses.append(total.detach().item())
            return total, parts, student

        module.compute_losses = record
        trainer = L.Trainer(
            max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, data())
        return losses, float(trainer.callback_metrics["val/acc"])

    live_losses, live_acc = fit()

    def no_teachers(*a, **k):
        raise AssertionError("a teacher ran during cached training")

    monkeypatch.setattr(TeacherEnsemble, "forward", no_teachers)
    cached_losses, cached_acc = fit(teacher_cache=str(out))
    # Same crops, same order, same targets (fp16): the first step is the same step.
    assert cached_losses[0] == pytest.approx(live_losses[0], abs=1e-4)
    # Then fp16 rounding lets the runs drift apart, but not in what they learn.
    assert live_acc > 0.5 and abs(cached_acc - live_acc) < 0.05, (live_acc, cached_acc)


def test_pooled_features_are_cached_for_nd(tmp_path):
    module, dm = _module(), _data()
    plain = build_teacher_cache(module, dm, tmp_path / "p0", epochs=2, progress=False)
    torch.manual_seed(0)  # the same (random) teachers as the cache's
    with pytest.raises(ConfigError, match="rebuild it with --pooled"):
        DistillationModule(
            student=ModelConfig(**CNN), teachers=[ModelConfig(**CNN), ModelConfig(**VIT)],
            terms=[ND(cache_dir="")], teacher_cache=str(plain), eval_teachers=False,
        )  # fmt: skip
    pooled = build_teacher_cache(module, dm, tmp_path / "p1", epochs=2, pooled=True,
                                 progress=False)  # fmt: skip
    outs = TeacherCache.open(pooled).lookup(0, dm.train_set.indices[:4])
    assert outs[1].pooled.shape == (4, 192)


def test_cache_and_fit_through_the_cli(tmp_path, capsys):
    from test_cli import CONFIG, _write

    from visdistill.cli import main

    config = _write(tmp_path, {**CONFIG, "trainer": {**CONFIG["trainer"], "max_epochs": 2}})
    main(["cache", "--config", config, "--out", str(tmp_path / "cache"), "--batch-size", "64"])
    assert "teacher cache written" in capsys.readouterr().out
    main(["fit", "--config", config, "--model.teacher_cache", str(tmp_path / "cache")])
    with pytest.raises(SystemExit):  # a run longer than the cache is refused, in one line
        main(["fit", "--config", config, "--model.teacher_cache", str(tmp_path / "cache"),
              "--trainer.max_epochs", "3"])  # fmt: skip
    assert "holds 2 epochs of augmentations but the run trains 3" in capsys.readouterr().err


def test_live_and_cached_teachers_are_one_interface(cache_dir):
    from visdistill.teacher_source import CachedTeachers, LiveTeachers, TeacherSource

    module, dm = _module(), _data()
    live = LiveTeachers(module.teachers)
    cached = CachedTeachers.open(cache_dir, module, dm, max_epochs=2)
    assert isinstance(live, TeacherSource) and isinstance(cached, TeacherSource)
    # Per-sample epochs: samples of epochs 0 and 1 in one batch, read with their own crops.
    keys = [(e, i) for i in range(0, 64, 9) for e in (0, 1)]
    batch = torch.utils.data.default_collate([dm.train_set[k] for k in keys])
    batch["epoch"] = torch.tensor([e for e, _ in keys])
    for out, read in zip(live.outputs(batch), cached.outputs(batch), strict=True):
        assert read.logits.shape == out.logits.shape == (len(keys), 10)
        assert torch.allclose(read.logits, out.logits.log_softmax(-1), atol=5e-3)
    # Without an epoch key the source reads the epoch it is given.
    del batch["epoch"]
    one = cached.outputs(batch, epoch=1)[0].logits
    assert torch.equal(one, cached.cache.lookup(1, batch["index"])[0].logits)
    with pytest.raises(ConfigError, match=r"holds epochs 0\.\.1, asked for epoch 2"):
        cached.outputs(batch, epoch=2)


def test_the_module_reads_the_cache_in_training_and_runs_the_teachers_in_evaluation(cache_dir):
    from visdistill.teacher_source import CachedTeachers

    module, dm = _module(teacher_cache=str(cache_dir)), _data()
    assert module.train_teachers is module.live_teachers  # until fit opens the cache
    module.train_teachers = CachedTeachers.open(cache_dir, module, dm, max_epochs=2)
    batch = torch.utils.data.default_collate([dm.train_set[(0, i)] for i in range(4)])
    module.train()
    cached = module.teacher_outputs(batch)
    module.eval()
    live = module.teacher_outputs(batch)
    assert torch.allclose(cached[0].logits, live[0].logits.log_softmax(-1), atol=5e-3)
    assert not torch.allclose(cached[0].logits, live[0].logits)  # logits, not log-probs
