"""Image folders converted to LitData shards: the shards hold exactly the folder's images
and labels, conversions refuse to overwrite, resume after a failure, and training streams
them split between DDP ranks."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import IterableDataset

import visdistill.data.shards as shards
from visdistill.data import (
    ImageFolderDataModule,
    ShardsDataModule,
    convert_image_folder,
    split_indices,
)
from visdistill.errors import ConfigError, DataNotFoundError

CLASSES = ("three", "one", "two")  # not sorted: labels follow ImageFolder's sorted order


def _digits_folder(root: Path, n: int = 60, flat: bool = False) -> Path:
    """``n`` scikit-learn digits, upscaled to 24 px PNGs, in 3 class folders (by digit % 3)
    or flat."""
    digits = load_digits()
    for i in range(n):
        pixels = (digits.images[i] * 255 / 16).round().astype(np.uint8)
        image = Image.fromarray(pixels).resize((24, 24), Image.BILINEAR)
        folder = root if flat else root / CLASSES[int(digits.target[i]) % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"digit{i:03d}.png")
    return root


def _pixels_and_labels(loader) -> Counter:
    """Multiset of (image bytes as uint8, label) over a loader's batches, and the indices."""
    seen = Counter()
    for batch in loader:
        assert {"image", "target", "index"} <= set(batch)
        for image, target in zip(batch["image"], batch["target"], strict=True):
            seen[((image * 255).round().to(torch.uint8).numpy().tobytes(), int(target))] += 1
    return seen


def _stored(out: Path) -> Counter:
    """Multiset of (stored bytes, label) read back raw from the shards."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(out))
    return Counter((bytes(ds[i]["image"]), int(ds[i]["target"])) for i in range(len(ds)))


def _files(src: Path) -> Counter:
    """Multiset of (file bytes, label) of an image folder."""
    return Counter((Path(p).read_bytes(), t) for p, t in shards.open_folder(src, "src").samples)


def test_shards_hold_and_train_on_exactly_the_folder(tmp_path):
    src = _digits_folder(tmp_path / "digits")
    out = tmp_path / "shards"
    manifest = convert_image_folder(src, out, num_workers=2, chunk_bytes=2048, progress=False)

    folder = ImageFolderDataModule(str(src), val_split=0, augment=False, image_size=24)
    assert manifest["status"] == "complete" and manifest["num_samples"] == 60
    assert manifest["classes"] == sorted(CLASSES) == shards.open_folder(src, "src").classes
    assert manifest["image_formats"] == {"png": 60} and manifest["labelled"]
    assert sum(manifest["class_counts"].values()) == 60
    assert json.loads((out / shards.MANIFEST).read_text()) == manifest
    assert len(list(out.glob("chunk-*.bin"))) > 2  # several chunks, from both workers

    # The stored bytes are the files' bytes, with the folder's labels.
    assert _stored(out) == _files(src)

    # Training from the shards sees the folder's pixels and labels, and its indices.
    dm = ShardsDataModule(str(out), val_split=0, augment=False, image_size=24, batch_size=16)
    assert dm.classes == sorted(CLASSES) and dm.num_classes == 3 and dm.has_labels
    dm.setup("fit")
    folder.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, IterableDataset)  # Lightning adds no sampler to it
    assert _pixels_and_labels(loader) == _pixels_and_labels(folder.train_dataloader())
    indices = sorted(int(i) for b in dm.train_dataloader() for i in b["index"])
    assert indices == list(range(60))

    # val_split / train_subset carve the same samples as the folder module.
    dm = ShardsDataModule(str(out), val_split=0.25, train_subset=30, augment=False, image_size=24)
    folder = ImageFolderDataModule(
        str(src), val_split=0.25, train_subset=30, augment=False, image_size=24
    )
    dm.setup("fit")
    folder.setup("fit")
    for ours, theirs in ((dm.train_dataloader(), folder.train_dataloader()),
                         (dm.val_dataloader(), folder.val_dataloader())):  # fmt: skip
        got = sorted(int(i) for b in ours for i in b["index"])
        assert got == sorted(int(i) for b in theirs for i in b["index"])
    assert len(dm.val_set) == 15


def test_flat_folder_has_no_labels(tmp_path):
    src = _digits_folder(tmp_path / "flat", n=12, flat=True)
    out = tmp_path / "shards"
    manifest = convert_image_folder(src, out, num_workers=1, progress=False)
    assert manifest["classes"] == [] and not manifest["labelled"]
    dm = ShardsDataModule(str(out), val_split=0, augment=False, image_size=24, batch_size=5)
    assert not dm.has_labels and dm.num_classes == 0
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert torch.cat([b["target"] for b in batches]).tolist() == [-1] * 12
    # A labelled folder read with labels: false also yields -1.
    labelled = convert_image_folder(
        _digits_folder(tmp_path / "lab", n=6), tmp_path / "lab_shards", num_workers=1,
        progress=False,
    )  # fmt: skip
    assert labelled["labelled"]
    dm = ShardsDataModule(str(tmp_path / "lab_shards"), val_split=0, labels=False, image_size=24)
    dm.setup("fit")
    assert {int(t) for b in dm.train_dataloader() for t in b["target"]} == {-1}


def test_conversion_refuses_to_overwrite(tmp_path):
    src = _digits_folder(tmp_path / "digits", n=9)
    out = tmp_path / "shards"
    convert_image_folder(src, out, num_workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="already holds a finished conversion.*overwrite"):
        convert_image_folder(src, out, num_workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # overwrite replaces a conversion of ours ...
    smaller = _digits_folder(tmp_path / "smaller", n=5)
    manifest = convert_image_folder(smaller, out, num_workers=1, overwrite=True, progress=False)
    assert manifest["status"] == "complete" and manifest["num_samples"] == 5
    assert _stored(out) == _files(smaller)
    # ... but never a folder holding anything else, even with overwrite.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not write.*notes.txt"):
        convert_image_folder(src, out, num_workers=1, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.json").exists()
    with pytest.raises(ConfigError, match="chunk_bytes must be .* such as '64MB', got '64XB'"):
        convert_image_folder(src, tmp_path / "new", chunk_bytes="64XB", progress=False)
    assert not (tmp_path / "new").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "chunk-0-0.bin").write_bytes(b"someone else's shards")
    with pytest.raises(ConfigError, match="without a visdistill manifest"):
        convert_image_folder(src, other, num_workers=1, progress=False)
    assert (other / "chunk-0-0.bin").read_bytes() == b"someone else's shards"


def test_an_interrupted_conversion_resumes(tmp_path, monkeypatch, capsys):
    src = _digits_folder(tmp_path / "digits")
    out = tmp_path / "shards"
    encode = shards._encode_sample

    def fails_at_45(samples, labelled, index):
        if index == 45:  # the second worker's 16th image, after some chunks are written
            raise OSError("disk went away")
        return encode(samples, labelled, index)

    monkeypatch.setattr(shards, "_encode_sample", fails_at_45)
    with pytest.raises(DataNotFoundError, match="OSError: disk went away.*resumes"):
        convert_image_folder(src, out, num_workers=2, chunk_bytes=1024, progress=False)
    monkeypatch.setattr(shards, "_encode_sample", encode)
    # What LitData leaves: chunks, checkpoints, no index.json; our manifest says so.
    assert not (out / "index.json").exists() and (out / ".checkpoints").is_dir()
    assert shards.read_manifest(out)["status"] == "converting"
    with pytest.raises(DataNotFoundError, match="unfinished conversion"):
        ShardsDataModule(str(out))
    # The chunks LitData's checkpoints record are done; a resume keeps them as they are.
    recorded = [
        c["filename"]
        for f in (out / ".checkpoints").glob("checkpoint-*.json")
        for c in json.loads(f.read_text())["chunks"]
    ]
    written = {name: (out / name).stat().st_mtime_ns for name in recorded}
    assert len(written) >= 3

    # The folder changed in between: the partial output is refused, not mixed.
    extra = _digits_folder(tmp_path / "more", n=61)
    with pytest.raises(ConfigError, match="interrupted conversion .* does not match"):
        convert_image_folder(extra, out, num_workers=2, chunk_bytes=1024, progress=False)

    # Resume (a different num_workers is overridden: LitData resumes with the first run's).
    capsys.readouterr()
    with pytest.warns(UserWarning, match="first run's settings"):
        manifest = convert_image_folder(src, out, num_workers=1)
    # The progress bar starts at the images the first run converted and ends at all 60.
    bar = capsys.readouterr().err
    first = re.search(r"converting into shards: .*?(\d+)/60", bar)
    assert first and int(first.group(1)) >= 20 and "60/60" in bar
    assert manifest["status"] == "complete" and manifest["num_workers"] == 2
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.bin") if p.name in written}
    assert kept == written  # resumed, not restarted
    assert _stored(out) == _files(src)  # every image once


def test_training_stream_is_split_between_ranks(tmp_path, monkeypatch):
    import litdata.streaming.dataset as streaming
    from litdata.utilities.env import _DistributedEnv

    out = tmp_path / "shards"
    convert_image_folder(_digits_folder(tmp_path / "d"), out, num_workers=2, chunk_bytes=1024,
                         progress=False)  # fmt: skip
    seen = []
    for rank in range(2):
        # What LitData detects inside a 2-process DDP run on this rank.
        env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)
        monkeypatch.setattr(streaming._DistributedEnv, "detect", lambda env=env: env)
        dm = ShardsDataModule(str(out), val_split=0.25, image_size=16, batch_size=4)
        dm.setup("fit")
        # Validation is read by position: Lightning's DistributedSampler splits all of it.
        assert len(dm.val_set) == 15
        seen.append([int(i) for b in dm.train_dataloader() for i in b["index"]])
    assert not set(seen[0]) & set(seen[1])  # each rank reads its own part
    # Equal shares (DDP needs them); at most one batch per rank is dropped for that.
    assert len(seen[0]) == len(seen[1]) >= 45 // 2 - 4
    train, _ = split_indices(60, 0.25, seed=0)
    assert set(seen[0]) | set(seen[1]) <= set(train.tolist())


def test_shards_data_module_refuses_missing_or_foreign_folders(tmp_path):
    with pytest.raises(DataNotFoundError, match="not found"):
        ShardsDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataNotFoundError, match="convert an image folder first"):
        ShardsDataModule(str(tmp_path / "plain"))


class _RecordIndices(L.Callback):
    """Writes the sample indices each rank trained and validated on to ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.train, self.val = folder, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert batch["image"].shape[1:] == (3, 16, 16) and batch["target"].dtype == torch.int64
        self.train += batch["index"].tolist()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val += batch["index"].tolist()

    def on_fit_end(self, trainer, pl_module):
        record = {"train": self.train, "val": self.val, "world": trainer.world_size}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _fit_from_shards(out: Path, root: Path, devices: int) -> list[dict]:
    from visdistill import DistillationModule, ModelConfig

    student = ModelConfig(
        name="resnet10t", num_classes=3, model_kwargs=dict(channels=(8, 8, 16, 16), stem_width=8)
    )
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[_RecordIndices(root)],
    )
    data = ShardsDataModule(str(out), val_split=12, image_size=16, batch_size=8)
    trainer.fit(DistillationModule(student=student), data)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.parametrize(
    "devices",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # 2 ddp_spawn processes: ~40 s on 2 busy cores
    ids=["one_process", "ddp_2_gloo"],
)
def test_fit_streams_the_shards(tmp_path, devices):
    """A Lightning fit from shards: one process trains on every training image once per
    epoch; two DDP (gloo) processes each stream their own share, validation is split."""
    out = tmp_path / "shards"
    convert_image_folder(
        _digits_folder(tmp_path / "d"), out, num_workers=2, chunk_bytes=1024, progress=False
    )
    train_idx, val_idx = (set(x.tolist()) for x in split_indices(60, 12, seed=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks = _fit_from_shards(out, tmp_path, devices)
    # LitData's length is exact per rank and worker: Lightning's doubt about it is dropped.
    assert not [w for w in caught if "has `__len__` defined" in str(w.message)]
    assert [r["world"] for r in ranks] == [devices] * devices
    if devices == 1:
        assert sorted(ranks[0]["train"]) == sorted(train_idx)
        assert sorted(ranks[0]["val"]) == sorted(val_idx)
        return
    first, second = (set(r["train"]) for r in ranks)
    assert not first & second and first | second <= train_idx
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) >= 48 // 2 - 8
    assert set(ranks[0]["val"]) | set(ranks[1]["val"]) == val_idx


@pytest.mark.slow
def test_a_killed_conversion_resumes(tmp_path):
    """SIGKILL of the converting process (not a Python error): its conversion processes stop
    with it, and running the conversion again completes it with every image once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = _digits_folder(tmp_path / "digits", n=1500)
    out = tmp_path / "shards"
    script = (
        "import sys; from visdistill.data import convert_image_folder; "
        "convert_image_folder(sys.argv[1], sys.argv[2], num_workers=2, chunk_bytes=2048, "
        "progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out)])
    deadline = time.monotonic() + 300
    while not list(out.glob(".checkpoints/checkpoint-*.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the conversion ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # the conversion group notices its caller is gone (within 0.5 s)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.bin")}
    time.sleep(1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.bin")} == done  # stopped
    assert not (out / "index.json").exists()
    manifest = convert_image_folder(src, out, progress=False)
    assert manifest["status"] == "complete" and manifest["num_samples"] == 1500
    assert _stored(out) == _files(src)


def test_convert_command_writes_the_same_shards_as_the_function(tmp_path, capsys):
    from visdistill.commands import main

    src = _digits_folder(tmp_path / "digits", n=30)
    out = tmp_path / "shards"
    main(["convert", str(src), "--out", str(out), "--num_workers", "1", "--progress", "false"])
    printed = capsys.readouterr().out
    assert "converted 30 images (3 classes)" in printed and "ShardsDataModule" in printed
    assert _stored(out) == _files(src)
    with pytest.raises(SystemExit) as e:  # a finished conversion is not replaced silently
        main(["convert", str(src), "--out", str(out), "--num_workers", "1"])
    assert e.value.code != 0
    assert "overwrite" in capsys.readouterr().err
