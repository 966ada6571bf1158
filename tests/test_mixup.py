"""Mixup / CutMix by timm's names: timm's own mixing, replayable per (seed, epoch, batch),
soft targets through the module, refusals, and the per-image approximation against the
teachers' exact outputs on the mixed images."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CNN
from timm.data import Mixup

from visdistill import KD, ConfigError, DigitsDataModule, DistillationModule, ModelConfig
from visdistill.data.mixing import (
    BatchMixer,
    approximate_mixed_targets,
    hard_labels,
    mixed_target_error,
)
from visdistill.terms.dkd import DKD
from visdistill.terms.nd import ND

MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


def _batch(b=6, k=10, size=16, epoch=0, first=3):
    g = torch.Generator().manual_seed(0)
    index = torch.arange(first, first + b)
    return {
        "image": torch.rand(b, 3, size, size, generator=g),
        "target": torch.randint(0, k, (b,), generator=g),
        "index": index,
        "epoch": torch.full((b,), epoch),
    }


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize(
    "options",
    [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0), dict(cutmix_minmax=(0.2, 0.8)), MIX],
)
def test_mixing_is_timms(mode, options):
    """With the same numpy draws, BatchMixer gives timm's Mixup images and soft targets."""
    batch = _batch()
    mixer = BatchMixer(10, mixup_mode=mode, **options)
    timm_kwargs = {
        "mixup_alpha": options.get("mixup_alpha", 0.0),
        "cutmix_alpha": options.get("cutmix_alpha", 0.0),
        "cutmix_minmax": options.get("cutmix_minmax"),
        "label_smoothing": options.get("label_smoothing", 0.0),
    }
    for draw in range(4):
        np.random.seed(draw)
        mixed, target, lam = mixer.mix(batch["image"], batch["target"])
        np.random.seed(draw)
        ref_x, ref_t = Mixup(**timm_kwargs, mode=mode, num_classes=10)(
            batch["image"].clone(), batch["target"]
        )
        assert torch.equal(mixed, ref_x)
        torch.testing.assert_close(target, ref_t, rtol=0, atol=1e-6)
        assert target.shape == (6, 10) and torch.allclose(target.sum(-1), torch.ones(6))
        assert ((lam > 0) & (lam <= 1)).all()
    assert not torch.equal(mixed, batch["image"])  # the input batch is left alone


def test_an_odd_batch_leaves_its_last_sample_unmixed():
    batch = _batch(b=7)
    np.random.seed(1)
    mixed, target, lam = BatchMixer(10, **MIX).mix(batch["image"], batch["target"])
    np.random.seed(1)
    ref_x, ref_t = Mixup(**MIX, num_classes=10)(batch["image"][:6].clone(), batch["target"][:6])
    assert torch.equal(mixed[:6], ref_x) and torch.equal(mixed[6], batch["image"][6])
    torch.testing.assert_close(target[:6], ref_t, rtol=0, atol=1e-6)
    assert lam[6] == 1 and target[6].argmax() == batch["target"][6]
    # Without an epoch (a pass outside the training loop): seeded by the first index.
    del batch["epoch"]
    state = np.random.get_state()[1].copy()
    a, b = BatchMixer(10, **MIX)(batch), BatchMixer(10, **MIX)(batch)
    assert torch.equal(a["image"], b["image"]) and np.array_equal(np.random.get_state()[1], state)


def test_mixing_replays_by_seed_epoch_and_first_index():
    mixer = BatchMixer(10, seed=4, **MIX)
    a, b = mixer(_batch()), mixer(_batch())
    assert all(torch.equal(a[k], b[k]) for k in ("image", "target", "mix_lam"))
    state = torch.get_rng_state()
    others = [mixer(_batch(epoch=e)) for e in range(1, 6)] + [
        mixer(_batch(first=f)) for f in range(4, 9)
    ]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's streams untouched
    assert all(not torch.equal(a["image"], o["image"]) for o in others)


def test_labels_off_mixes_images_only():
    batch = _batch()
    batch["target"] = torch.full((6,), -1)
    out = BatchMixer(10, **MIX)(batch)
    assert torch.equal(out["target"], batch["target"])
    assert not torch.equal(out["image"], batch["image"])


def test_hard_labels_and_approximation_by_hand():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    assert hard_labels(soft).tolist() == [0, 2]
    assert hard_labels(torch.tensor([1, 2])).tolist() == [1, 2]
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])
    lam = torch.tensor([0.75, 1.0, 1.0, 0.25])
    # Sample i mixes with sample 3 - i.
    expected = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.2, 0.8], [0.75, 0.25]])
    torch.testing.assert_close(approximate_mixed_targets(p, lam), expected)


def _digits(**kw):
    kw = {"batch_size": 8, "train_subset": 36, "val_split": 20, **MIX, **kw}
    dm = DigitsDataModule(**kw)
    dm.setup("fit")
    return dm


def test_data_module_mixes_training_batches_only():
    dm = _digits()
    batches = list(dm.train_dataloader())
    assert len(batches) == 36 // 8  # the short last batch is dropped
    for b in batches:
        assert b["target"].shape == (8, 10) and b["target"].dtype == torch.float32
        assert torch.allclose(b["target"].sum(-1), torch.ones(8))
        assert b["mix_lam"].shape == (8,) and (b["epoch"] == 0).all()
    v = next(iter(dm.val_dataloader()))
    assert v["target"].dtype == torch.int64 and "mix_lam" not in v
    aug = dm.augmentation()
    assert aug["kind"] == "crop_flip" and aug["mixing"]["mixup_alpha"] == 0.8
    assert aug["batch_size"] == 8 and aug["drop_last"] is True and aug["world_size"] == 1
    assert "shuffle_seed" in aug
    # Mixing off: the description is the crop and flip alone, as before.
    plain = _digits(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    assert "mixing" not in plain.augmentation()


def test_workers_mix_the_same_batches():
    def epochs(workers):
        dm = _digits(num_workers=workers)
        loader = dm.train_dataloader()
        out = []
        for e in range(2):
            loader.sampler.set_epoch(e)
            out += list(loader)
        return out

    one, two = epochs(0), epochs(2)
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "target", "index", "mix_lam"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(batch_size=7), "batch_size must be even"),
        (dict(mixup_mode="rows"), "mixup_mode must be one of batch, pair, elem"),
        (dict(cutmix_minmax=(0.5, 0.2)), "cutmix_minmax"),
        (dict(mixup_prob=1.5), "mixup_prob is a probability"),
        (dict(mixup_alpha=-1.0), "mixup_alpha must be >= 0"),
        (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "set model.label_smoothing instead"),
    ],
)
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DigitsDataModule(**{**MIX, **kw})


def test_too_few_samples_for_one_batch():
    dm = _digits(batch_size=64)
    with pytest.raises(ConfigError, match="no batch is left"):
        dm.train_dataloader()


def _trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


def _module(terms=None, **kw):
    return DistillationModule(
        student=ModelConfig(**CNN),
        teachers=[ModelConfig(**CNN)],
        terms=terms if terms is not None else [KD(temperature=2.0)],
        **kw,
    )


def test_soft_targets_through_the_module(tmp_path):
    """CE on soft targets is the hand-computed soft cross-entropy; the teachers get the
    batch's mixed images; train accuracy and DKD get the dominant class."""
    module = _module(terms=[KD(temperature=2.0), DKD()])
    seen, accuracy_targets = [], []
    live = module.live_teachers.outputs
    module.live_teachers.outputs = lambda batch, epoch=0: (
        seen.append(batch["image"]) or live(batch, epoch)
    )
    update = module.train_acc.update
    module.train_acc.update = lambda p, t: accuracy_targets.append(t) or update(p, t)
    batches = []

    class Keep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append({k: v.clone() for k, v in batch.items()})
            with torch.no_grad():
                _, parts, out = pl_module.compute_losses(batch)
            log_p = F.log_softmax(out.logits, -1)
            expected = -(batch["target"] * log_p).sum(-1).mean()
            torch.testing.assert_close(parts["ce"], expected)

    _trainer(tmp_path, max_steps=2, callbacks=[Keep()]).fit(module, _digits())
    assert len(batches) == 2
    # compute_losses ran twice per step (the callback's and the step's).
    for i, b in enumerate(batches):
        assert torch.equal(seen[2 * i + 1], b["image"])
        assert torch.equal(accuracy_targets[i], b["target"].argmax(-1))
    assert any((b["mix_lam"] < 1).any() for b in batches)


def test_nd_and_double_smoothing_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="ND cannot train on mixup/CutMix batches"):
        _trainer(tmp_path, max_steps=1).fit(_module(terms=[ND(cache_dir="")]), _digits())
    with pytest.raises(ConfigError, match="smooth the mixup/CutMix targets a second time"):
        _trainer(tmp_path, max_steps=1).fit(_module(label_smoothing=0.1), _digits())


@pytest.mark.skipif(
    not __import__("visdistill.data.fashion_mnist", fromlist=["x"]).DEBIAN_DIR.exists(),
    reason="Debian dataset-fashion-mnist not installed",
)
@pytest.mark.parametrize(
    "options", [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0)], ids=["mixup", "cutmix"]
)
def test_per_image_approximation_against_the_exact_targets(options):
    """The zoo teacher on Fashion-MNIST: mixing its per-image outputs is not its output on
    the mixed image (what the exact cache stores); with nothing mixed they agree."""
    from torch.utils.data import DataLoader

    from visdistill.data import FashionMNISTDataModule
    from visdistill.data.replay import EpochSampler
    from visdistill.models import Backbone

    teacher = Backbone(name="zoo:fmnist_resnet10t")
    dm = FashionMNISTDataModule(batch_size=32, train_subset=64, **options)
    dm.setup("fit")
    sampler = EpochSampler(len(dm.train_set), seed=0)
    mixer, never = dm.mixer(), BatchMixer(10, mixup_prob=0.0, **options)
    for batch in DataLoader(dm.train_set, batch_size=32, sampler=sampler):
        mixed = mixer(batch)
        assert (mixed["mix_lam"] < 1).all()
        err = mixed_target_error(
            lambda x: teacher(x).logits, batch["image"], mixed["image"], mixed["mix_lam"]
        )
        assert err["kl"] > 1e-3 and err["max_abs_logp"] > 0.1 and err["mixed_fraction"] == 1
        assert 0 < err["top1_agreement"] <= 1
        same = never(batch)
        assert torch.equal(same["image"], batch["image"]) and (same["mix_lam"] == 1).all()
        err = mixed_target_error(
            lambda x: teacher(x).logits, batch["image"], same["image"], same["mix_lam"]
        )
        assert err["kl"] == pytest.approx(0, abs=1e-6) and err["max_abs_logp"] < 1e-4
