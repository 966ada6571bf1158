"""Replayable augmentation: every random draw of timm's ``create_transform`` pipelines for
sample ``i`` in epoch ``e`` is a function of (data seed, e, i): across calls, DataLoader
workers and processes, and without touching the caller's random streams."""

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from visdistill.data.augment import timm_transform
from visdistill.data.replay import EpochSampler, ReplayTransform, replay_entropy, replayed_rng
from visdistill.errors import ConfigError
from visdistill.loader_pass import stop_workers

SIZE = 64
# One entry per augmentation kind; each alone is random, so replaying it is a real check.
KINDS = {
    "rrc": dict(hflip=0.0, color_jitter=None),
    "flip": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=None),
    "rand-m9-mstd0.5": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, auto_augment="rand-m9-mstd0.5"),
    "color_jitter": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.4),
    "erasing": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=None, re_prob=1.0, re_mode="pixel"),
    "all": dict(auto_augment="rand-m9-mstd0.5", re_prob=0.5, re_mode="pixel"),
}  # fmt: skip


def digit_images(n: int) -> list[Image.Image]:
    """scikit-learn digits, upscaled to 64 px RGB PIL images (real strokes, not noise)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for k in range(n):
        a = (digits.images[k] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        images.append(img)
    return images


@pytest.fixture(scope="module")
def images():
    return digit_images(8)


def _replayed(kind: str, seed: int = 3) -> ReplayTransform:
    return ReplayTransform(timm_transform(True, SIZE, **KINDS[kind]), seed)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_replays_and_differs_by_epoch_and_index(kind, images):
    t = _replayed(kind)
    img = images[0]
    first = t(img, 2, 5)
    assert torch.equal(first, t(img, 2, 5))
    assert torch.equal(first, _replayed(kind)(img, 2, 5))  # a new transform object too
    # Another epoch, another sample, another seed: other draws (a flip alone matches half
    # the time, so several keys are compared).
    others = [t(img, e, 5) for e in range(3, 9)]
    assert any(not torch.equal(first, o) for o in others)
    assert any(not torch.equal(first, t(img, 2, i)) for i in range(6, 12))
    assert any(not torch.equal(first, _replayed(kind, seed=s)(img, 2, 5)) for s in range(4, 10))
    # The plain transform is random: without the replay the same call differs.
    plain = t.transform
    assert any(not torch.equal(plain(img), plain(img)) for _ in range(6))


def test_global_random_streams_are_untouched(images):
    t = _replayed("all")
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    py, npy, tch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    for i in range(4):
        t(images[i], 0, i)
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == npy[0] and np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]
    assert torch.equal(torch.get_rng_state(), tch)
    # The next draws are those the caller would have had without the transform calls.
    expected = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), expected)


def test_streams_restored_when_the_transform_raises():
    state = torch.get_rng_state()

    def boom(_):
        torch.rand(5)
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        ReplayTransform(boom, 0)(None, 0, 0)
    assert torch.equal(torch.get_rng_state(), state)


def test_keys_hash_stably_and_distinctly():
    assert replay_entropy(0, 1, 2) == replay_entropy(0, 1, 2)
    keys = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (0, 1, 2, 1), (0, 12, 0)]
    assert len({tuple(replay_entropy(*k)) for k in keys}) == len(keys)
    with replayed_rng(0, 1, 2):
        a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    with replayed_rng(0, 1, 2):
        b = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert a == b
    with pytest.raises(ValueError, match="non-negative"):
        replay_entropy(0, -1, 2)


class _Keyed(Dataset):
    """PIL images served with a ReplayTransform under (epoch, position) keys."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, i = key
        return {"image": self.transform(self.images[i], epoch, i), "index": i}


def _epoch_batches(images, workers: int, epochs: int = 2) -> list[dict]:
    sampler = EpochSampler(len(images), shuffle=True, seed=5)
    loader = DataLoader(
        _Keyed(images, _replayed("all")), batch_size=3, sampler=sampler, num_workers=workers
    )
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out += list(loader)
    return out


def test_dataloader_workers_give_the_same_images(images):
    one, two = _epoch_batches(images, 0), _epoch_batches(images, 2)
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    # The epochs' draws differ for the same sample.
    first = {int(i): img for b in one[:3] for i, img in zip(b["index"], b["image"], strict=True)}
    second = {int(i): img for b in one[3:] for i, img in zip(b["index"], b["image"], strict=True)}
    assert any(not torch.equal(first[i], second[i]) for i in first)


_CHILD = """
import pickle, sys
from tests.test_replay_augment import _replayed, digit_images
images = digit_images(3)
out = {k: [_replayed(k)(images[i], e, i) for e in (0, 7) for i in range(3)] for k in sys.argv[2:]}
pickle.dump(out, open(sys.argv[1], "wb"))
"""


def test_another_process_replays_the_same_images(images, tmp_path):
    kinds = ["rrc", "rand-m9-mstd0.5", "erasing"]
    path = tmp_path / "child.pkl"
    # Another hash salt: the replay must not depend on Python's hash().
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _CHILD, str(path), *kinds], check=True, cwd=root, env=env)
    child = pickle.loads(path.read_bytes())
    for k in kinds:
        mine = [_replayed(k)(images[i], e, i) for e in (0, 7) for i in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(mine, child[k], strict=True)), k
    assert json.dumps(sorted(child)) == json.dumps(sorted(kinds))


def _png_folder(root, n: int = 12):
    """``n`` digits as 64 px PNGs in 2 class folders (even / odd digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for k, img in enumerate(digit_images(n)):
        folder = root / ("even" if digits.target[k] % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"d{k:03d}.png")
    return root


# Every kind at once, and mixing on top: what the shards must reproduce bit for bit.
FULL = dict(
    image_size=32,
    batch_size=4,
    val_split=2,
    auto_augment="rand-m9-mstd0.5",
    re_prob=0.5,
    re_mode="pixel",
    mean=(0.5,),
    std=(0.25,),
    seed=7,
)


def _batches(dm, epochs=2):
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        out += list(loader)
    stop_workers(loader)
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        assert all(torch.equal(x[k], y[k]) for k in x), [
            k for k in x if not torch.equal(x[k], y[k])
        ]


def test_image_folder_replays_across_workers_and_instances(tmp_path):
    from visdistill.data import ImageFolderDataModule

    src = str(_png_folder(tmp_path / "digits"))
    torch.manual_seed(0)  # the shuffle seed (the run's seed)
    one = _batches(ImageFolderDataModule(src, **FULL))
    torch.manual_seed(0)
    two = _batches(ImageFolderDataModule(src, num_workers=2, **FULL))
    _same(one, two)
    assert [int(b["epoch"][0]) for b in one] == [0, 0, 0, 1, 1, 1]
    # Epoch 1 draws other augmentations for the same samples.
    by_key = {
        (int(e), int(i)): x
        for b in one
        for e, i, x in zip(b["epoch"], b["index"], b["image"], strict=True)
    }
    assert any(not torch.equal(by_key[0, i], by_key[1, i]) for e, i in by_key if e == 0)
    dm = ImageFolderDataModule(src, **FULL)
    dm.setup("fit")
    aug = dm.augmentation()
    assert aug["kind"] == "timm_create_transform" and aug["seed"] == 7
    assert aug["auto_augment"] == "rand-m9-mstd0.5" and aug["mean"] == [0.5] * 3
    assert "mixing" not in aug
    off = ImageFolderDataModule(src, replay=False, **FULL)
    off.setup("fit")
    with pytest.raises(ConfigError, match="replay: true"):
        off.augmentation()
    assert "epoch" not in next(iter(off.train_dataloader()))


def test_shards_replay_the_folder_batches_with_mixing(tmp_path):
    """replay: true on shards reads by position: the same augmented, mixed batches as the
    image folder, in the same order."""
    from visdistill.data import ImageFolderDataModule, ShardsDataModule, convert_image_folder

    src = _png_folder(tmp_path / "digits")
    out = tmp_path / "shards"
    convert_image_folder(src, out, num_workers=1, progress=False)
    options = {**FULL, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    torch.manual_seed(0)
    folder = _batches(ImageFolderDataModule(str(src), **options))
    torch.manual_seed(0)
    shard = _batches(ShardsDataModule(str(out), replay=True, num_workers=2, **options))
    _same(folder, shard)
    assert folder[0]["target"].shape == (4, 2) and "mix_lam" in folder[0]


def test_student_spec_sets_the_augmentation_statistics(tmp_path):
    """Without a trainer (a cache build), ``student_spec`` gives the student's mean/std,
    as an attached run would."""
    from types import SimpleNamespace

    from visdistill.data import ImageFolderDataModule

    src = str(_png_folder(tmp_path / "digits", n=4))
    dm = ImageFolderDataModule(src, image_size=32, val_split=1, re_prob=1.0)
    assert dm.normalisation()[0] == (0.485, 0.456, 0.406)  # ImageNet's without a student
    dm.student_spec = SimpleNamespace(mean=(0.5,), std=(0.25,))
    dm.setup("fit")
    aug = dm.augmentation()
    assert aug["mean"] == [0.5] * 3 and aug["std"] == [0.25] * 3
