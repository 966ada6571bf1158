"""Image folders as streaming shards (LitData), and training from them.

:func:`convert_image_folder` writes an image folder (class sub-folders, or a flat folder
without labels, discovered exactly as :class:`~visdistill.data.folder.ImageFolderDataModule`
does) into LitData chunk files: each sample is the image file's bytes as read from disk
(PNG, JPEG, ... never decoded), its label and its position in the folder. The shards are
about the size of the folder. :class:`ShardsDataModule` trains from them with the same timm
augmentation as the folder module.

Why LitData: it is Lightning's own streaming engine and is maintained with it; a
``StreamingDataset`` splits the chunks between DDP ranks and DataLoader workers by itself,
reads local folders in place and streams object stores (``s3://``, ``gs://``) to a local
cache, so no node needs a full copy; ``optimize`` writes the shards with several processes
and can resume after a kill. WebDataset (tar shards) needs ``wids``/manual rank splitting
and has no resumable writer.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..checkpoints import atomic_write
from ..errors import ConfigError, DataNotFoundError
from .augment import TimmAugmentDataModule
from .base import UNLABELLED, split_indices, subset, warn_large_subset
from .folder import decode_image, open_folder
from .mixing import MixupCollate
from .replay import apply_keyed

MANIFEST = "visdistill_shards.json"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = "64MB"
# Every name a conversion writes into its output folder (LitData's chunks, per-worker index
# files, its resume checkpoints, our manifest and its atomic-write temporary files).
_OURS = re.compile(
    r"(index\.json|\d+\.index\.json|chunk-\d+-\d+\.bin|visdistill_shards\.json"
    r"|\.visdistill_shards\.json\.[^/]*\.tmp|\.checkpoints)"
)
_CHECKPOINT_FILE = re.compile(r"(config\.json|checkpoint-\d+\.json(\.tmp\.\d+)?)")


def _encode_sample(samples: list[tuple[str, int]], labelled: bool, index: int) -> dict[str, Any]:
    """One shard sample: the file's bytes, its label (``-1`` without labels) and its folder
    position. Runs in LitData's worker processes."""
    path, target = samples[index]
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # header only: rejects non-images early
            image.format  # noqa: B018
    except Exception as e:
        raise DataNotFoundError(
            f"cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file, "
            "then run the conversion again: it resumes where it stopped"
        ) from e
    return {"index": index, "target": int(target) if labelled else UNLABELLED, "image": data}


def _fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    """sha256 of the sample list (relative path and label per sample, in order)."""
    h = hashlib.sha256()
    for path, target in samples:
        h.update(f"{Path(path).relative_to(root).as_posix()}\t{target}\n".encode())
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The conversion manifest of a shards folder, or ``None`` when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataNotFoundError(f"cannot read the shards manifest {path}: {e}") from e


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def _foreign_entries(out: Path) -> list[str]:
    """Entries of ``out`` a conversion does not write."""
    foreign = [p.name for p in sorted(out.iterdir()) if not _OURS.fullmatch(p.name)]
    checkpoints = out / ".checkpoints"
    if checkpoints.is_dir():
        foreign += [
            f".checkpoints/{p.name}"
            for p in sorted(checkpoints.iterdir())
            if not _CHECKPOINT_FILE.fullmatch(p.name)
        ]
    elif checkpoints.exists():
        foreign.append(".checkpoints")
    return foreign


def _remove_conversion(out: Path) -> None:
    """Delete a previous conversion's files, one known name at a time (only called once
    :func:`_foreign_entries` found nothing else in ``out``)."""
    checkpoints = out / ".checkpoints"
    if checkpoints.is_dir():
        for p in checkpoints.iterdir():
            p.unlink()
        checkpoints.rmdir()
    for p in out.iterdir():
        if p.name != MANIFEST:
            p.unlink()
    (out / MANIFEST).unlink(missing_ok=True)  # last: a crash before leaves it recognisable


@contextlib.contextmanager
def _private_litdata_cache() -> Iterator[None]:
    """Point LitData's scratch folders at a temporary folder of ours: ``optimize`` empties
    them on start, and their defaults (``/tmp/chunks``, ``/tmp/data``) are shared by every
    LitData user of the machine."""
    keys = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="visdistill-litdata-") as tmp:
        os.environ[keys[0]], os.environ[keys[1]] = f"{tmp}/chunks", f"{tmp}/data"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _check_order(out: Path, n: int) -> None:
    """The shards hold every folder position once, in folder order (what ``val_split``
    and ``train_subset`` rely on): counts from the index, and the first and last sample of
    every chunk read back."""
    from litdata import StreamingDataset

    index = json.loads((out / "index.json").read_text())
    sizes = [int(c["chunk_size"]) for c in index["chunks"]]
    if sum(sizes) != n:
        raise DataNotFoundError(
            f"the shards in {out} hold {sum(sizes)} samples, the folder {n}: the conversion "
            "is incomplete; convert again into an empty folder"
        )
    ds = StreamingDataset(str(out))
    start = 0
    for size in sizes:
        for pos in {start, start + size - 1} if size else ():
            if int(ds[pos]["index"]) != pos:
                raise DataNotFoundError(
                    f"the shards in {out} are not in folder order (sample {pos} holds folder "
                    f"image {int(ds[pos]['index'])}); convert again into an empty folder"
                )
        start += size


def _check_chunk_bytes(chunk_bytes: int | str) -> None:
    from litdata.utilities.format import _convert_bytes_to_int

    try:
        size = chunk_bytes if isinstance(chunk_bytes, int) else _convert_bytes_to_int(chunk_bytes)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"chunk_bytes must be a number of bytes or a size such as '64MB', got {chunk_bytes!r}"
        ) from e
    if size <= 0:
        raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes!r}")


def convert_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_workers: int | None = None,
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    start_method: str | None = None,
) -> dict[str, Any]:
    """Convert an image folder into LitData shards for :class:`ShardsDataModule`.

    ``src`` is laid out as ``src/<class>/<image>`` (labelled; classes sorted by name, as
    torchvision's ``ImageFolder``) or ``src/<image>`` (no labels). Each image is stored as
    its file's bytes, with its label and its position in the folder; ``out`` also gets
    ``visdistill_shards.json`` (class names, counts, source, image formats).

    Resumable: a conversion that was killed or stopped on an unreadable image continues
    from its last written chunk when run again with the same ``src`` and ``out`` (LitData's
    checkpoints; the number of workers and chunk size of the first run are kept). Safe:
    ``out`` must be empty, absent, or hold a conversion of ours; a finished conversion is
    replaced only with ``overwrite`` (which deletes only the files a conversion writes).

    Args:
        src: the image folder.
        out: the shards folder (created).
        num_workers: conversion processes (default: one per CPU).
        chunk_bytes: target chunk size, bytes or a string such as ``"64MB"``.
        overwrite: replace a finished (or restart an interrupted) conversion in ``out``.
        progress: show a progress bar (images converted, rate, ETA).
        start_method: start method of the conversion processes; default ``fork`` where
            available (as PyTorch's DataLoader: no re-import per worker), else ``spawn``.

    Returns:
        The manifest written to ``out/visdistill_shards.json``.
    """
    src, out = Path(src), Path(out)
    folder = open_folder(src, "src")
    samples = [(str(p), int(t)) for p, t in folder.samples]
    classes = list(folder.classes)
    labelled = bool(classes)
    identity = {
        "source": str(src.resolve()),
        "classes": classes,
        "labelled": labelled,
        "num_samples": len(samples),
        "samples_sha256": _fingerprint(src, samples),
    }
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    _check_chunk_bytes(chunk_bytes)
    settings = {"num_workers": num_workers or os.cpu_count() or 1, "chunk_bytes": chunk_bytes}

    previous = None
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"out {out} is a file; give a folder for the shards")
        foreign = _foreign_entries(out)
        if foreign:
            raise ConfigError(
                f"out {out.resolve()} holds files a conversion did not write "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); nothing was "
                "changed. Give an empty or new folder"
            )
        previous = read_manifest(out)
        if previous is None and any(out.iterdir()):
            raise ConfigError(
                f"out {out.resolve()} holds shards without a visdistill manifest; nothing was "
                "changed. Give an empty or new folder"
            )
    if previous is not None:
        finished = previous.get("status") == "complete"
        if overwrite:
            _remove_conversion(out)
            previous = None
        elif finished:
            raise ConfigError(
                f"out {out.resolve()} already holds a finished conversion of "
                f"{previous.get('source')}; nothing was changed. Give another folder, or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        elif {k: previous.get(k) for k in identity} != identity:
            raise ConfigError(
                f"out {out.resolve()} holds an interrupted conversion of "
                f"{previous.get('source')} ({previous.get('num_samples')} images) that does not "
                f"match {src.resolve()} ({len(samples)} images) as it is now; nothing was "
                "changed. Give another folder, or pass overwrite=True (--overwrite) to restart"
            )
        else:
            kept = {k: previous[k] for k in settings}
            if kept != settings and (num_workers is not None or chunk_bytes != DEFAULT_CHUNK_BYTES):
                warnings.warn(
                    f"resuming the interrupted conversion in {out} with its first run's "
                    f"settings {kept} (LitData resumes only with those), not {settings}",
                    UserWarning,
                    stacklevel=2,
                )
            settings = kept

    formats = Counter(Path(p).suffix.lower().lstrip(".") for p, _ in samples)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "status": "converting",
        **identity,
        **settings,
        "class_counts": dict(Counter(classes[t] for _, t in samples)) if labelled else {},
        "image_formats": dict(sorted(formats.items())),
        "source_bytes": sum(os.path.getsize(p) for p, _ in samples),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)

    if not (out / "index.json").is_file():  # else LitData finished before a kill
        _optimize(samples, labelled, out, settings, progress, start_method)
    _check_order(out, len(samples))
    chunks = json.loads((out / "index.json").read_text())["chunks"]
    manifest["shard_bytes"] = sum((out / c["filename"]).stat().st_size for c in chunks)
    manifest["status"] = "complete"
    _write_manifest(out, manifest)
    return manifest


def _optimize(
    samples: list[tuple[str, int]],
    labelled: bool,
    out: Path,
    settings: dict[str, Any],
    progress: bool,
    start_method: str | None,
) -> None:
    """LitData's ``optimize`` over the folder positions. Where processes can fork it runs in
    a process group of its own, killed when the conversion fails or is interrupted (LitData
    leaves helper processes of failed workers running otherwise), and its workers count the
    converted images for our progress bar (LitData's moves only when a worker finishes)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        _run_optimize(samples, labelled, out, settings, progress, start_method or "spawn", None)
        return
    ctx = multiprocessing.get_context("fork")
    start_method = start_method or "fork"
    # Shared memory reaches LitData's workers only through fork.
    counter = ctx.Value("q", 0) if progress and start_method == "fork" else None
    args = (samples, labelled, out, settings, progress and counter is None, start_method, counter)
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_optimize_in_group, args=(send, args), daemon=False)
    bar = _progress_bar(out, len(samples)) if counter is not None else None
    child.start()
    error: str | None = ""
    try:
        # Read while waiting: a long report would fill the pipe and block the child.
        while error == "" and (child.is_alive() or receive.poll()):
            if receive.poll(0.2):
                error = receive.recv()
            if bar is not None:
                bar.update(bar.initial_done + counter.value - bar.n)
        child.join()
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # the group only holds this conversion
        if bar is not None:
            bar.close()
    if error == "":
        error = f"the conversion process exited ({child.exitcode})"
    if error is not None:
        mine = re.search(r"visdistill\.errors\.DataNotFoundError: (.*)", error)
        if mine:
            raise DataNotFoundError(mine.group(1))
        lines = re.findall(r"^[\w.]*(?:Error|Exception|Interrupt)\b.*$", error, re.MULTILINE)
        # The first exception not raised by LitData's own wrapping is the cause.
        causes = [x for x in lines if not re.search("We found the following|Failed processing", x)]
        cause = (causes or lines or [error.strip()])[0]
        raise DataNotFoundError(
            f"converting into {out} failed: {cause}. Run the "
            "conversion again: it resumes where it stopped"
        )


def _progress_bar(out: Path, total: int) -> Any:
    """A tqdm bar over the folder's images, starting at those an interrupted run converted
    (LitData's checkpoints count them per worker)."""
    from tqdm.auto import tqdm

    done = 0
    for path in (out / ".checkpoints").glob("checkpoint-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            done += int(json.loads(path.read_text())["inputs_done"])
    bar = tqdm(total=total, initial=done, desc=f"converting into {out.name}", unit="img")
    bar.initial_done = done
    return bar


def _count(counter: Any, encode: Callable[[int], dict[str, Any]], index: int) -> dict[str, Any]:
    sample = encode(index)
    with counter.get_lock():
        counter.value += 1
    return sample


def _optimize_in_group(send: Any, args: tuple) -> None:
    # Objects inherited from the caller (a DataLoader's workers ...) are not this process's
    # to finalise: keep the garbage collector off them.
    gc.freeze()
    os.setsid()
    parent = os.getppid()

    def stop_with_the_caller() -> None:
        # A killed caller (kill -9, OOM) takes its conversion along, as a kill of the whole
        # job would: no conversion goes on unseen; running it again resumes.
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=stop_with_the_caller, daemon=True).start()
    try:
        _run_optimize(*args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        send.send(f"{type(e).__name__}: {e}")
    else:
        send.send(None)


def _run_optimize(
    samples: list[tuple[str, int]],
    labelled: bool,
    out: Path,
    settings: dict[str, Any],
    verbose: bool,
    start_method: str,
    counter: Any | None,
) -> None:
    from litdata import optimize

    encode = functools.partial(_encode_sample, samples, labelled)
    with _private_litdata_cache():
        optimize(
            fn=encode if counter is None else functools.partial(_count, counter, encode),
            # Folder positions (JSON-stable, so LitData's resume check recognises them).
            inputs=list(range(len(samples))),
            output_dir=str(out.resolve()),
            chunk_bytes=settings["chunk_bytes"],
            num_workers=settings["num_workers"],
            # Each worker converts a contiguous slice in order: shard order = folder order,
            # and LitData can checkpoint (it refuses to without ordered data).
            keep_data_ordered=True,
            reorder_files=False,
            use_checkpoint=True,
            start_method=start_method,
            verbose=verbose,
        )


class _DecodeSample:
    """A shard sample ``{"image": bytes, "target", "index"}`` as a canonical dict sample:
    the image decoded (RGB) and transformed (left a PIL image when ``transform`` is
    ``None``), ``target`` ``-1`` when not ``labelled``."""

    def __init__(self, transform: Callable[[Image.Image], Tensor] | None, labelled: bool) -> None:
        self.transform, self.labelled = transform, labelled

    def __call__(self, item: dict[str, Any]) -> dict[str, Tensor]:
        try:
            image = decode_image(bytes(item["image"]))
        except Exception as e:
            raise DataNotFoundError(
                f"cannot decode shard sample {item['index']}: {type(e).__name__}: {e}; "
                "convert the folder again"
            ) from e
        target = int(item["target"]) if self.labelled else UNLABELLED
        return {
            "image": self.transform(image) if self.transform is not None else image,
            "target": torch.tensor(target),
            "index": torch.tensor(int(item["index"])),
        }


class _MapStyle(Dataset):
    """Random access to a ``StreamingDataset`` (``None``: no samples), for evaluation:
    Lightning's DistributedSampler splits it between ranks, as for every other data module."""

    def __init__(self, streaming: Any | None) -> None:
        self.streaming = streaming
        # All its samples; len(streaming) is one rank's share under DDP.
        self.length = (
            0 if streaming is None else sum(b - a for a, b in streaming.region_of_interest)
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.streaming[i]


class _KeyedShards(_MapStyle):
    """Training samples read by position with :class:`EpochSampler`'s ``(epoch, position)``
    keys and a replayed transform, keyed by the image's folder position (``replay``): the
    same images, augmentations and batches as :class:`ImageFolderDataModule` gives."""

    def __init__(self, streaming: Any | None, transform: Callable[..., Tensor]) -> None:
        super().__init__(streaming)
        self.transform = transform

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        item = self.streaming[key[1] if isinstance(key, tuple) else key]
        image, extra = apply_keyed(self.transform, item["image"], key, int(item["index"]))
        return {**item, "image": image, **extra}


class ShardsDataModule(TimmAugmentDataModule):
    """Train from shards written by :func:`convert_image_folder` (LitData).

    Training streams the shards: LitData's ``StreamingDataset`` shuffles and splits the
    chunks between DDP ranks and DataLoader workers itself (Lightning adds no
    DistributedSampler to an iterable data set), so each rank reads only its part. With
    ``replay: true`` training reads samples by position instead, in the order and with the
    replayed augmentation :class:`ImageFolderDataModule` uses (the same batches, what a
    teacher cache needs), at the price of random reads across the shards.
    Validation and test samples are read by position, split between ranks by Lightning as
    for the other data modules. Batches are ``{"image", "target", "index"}`` with ``index``
    the image's position in the converted folder, as :class:`ImageFolderDataModule` gives.

    Args:
        train_dir: shards of the training images; validation is carved from them (the same
            seeded split as the folder module) unless ``val_dir``.
        val_dir: optional shards of separate validation images.
        test_dir: optional shards of test images.
        replay: replayable augmentation and batches (see above); off by default here, since
            it gives up streaming.
        **kwargs: timm's augmentation options (see
            :class:`~visdistill.data.augment.TimmAugmentDataModule`) and
            :class:`~visdistill.data.base.VisionDataModule`'s (``labels``, ...).
    """

    exact_iterable_length = True

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
        replay: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(replay=replay, **kwargs)
        self.train_dir = Path(train_dir)
        self.val_dir = Path(val_dir) if val_dir else None
        self.test_dir = Path(test_dir) if test_dir else None
        self.classes: list[str] = list(self._manifest(self.train_dir, "train_dir")["classes"])
        self.num_classes = len(self.classes)

    @staticmethod
    def _manifest(folder: Path, role: str) -> dict[str, Any]:
        if not folder.is_dir():
            raise DataNotFoundError(f"{role} shards folder not found: {folder.resolve()}")
        manifest = read_manifest(folder)
        if manifest is None:
            raise DataNotFoundError(
                f"{role} {folder.resolve()} holds no {MANIFEST}: convert an image folder "
                "first (visdistill.data.convert_image_folder)"
            )
        if manifest.get("status") != "complete":
            raise DataNotFoundError(
                f"{role} {folder.resolve()} holds an unfinished conversion of "
                f"{manifest.get('source')}; run the conversion again to finish it"
            )
        return manifest

    def _streaming(
        self, folder: Path, role: str, train: bool, indices: Tensor | None, keyed: bool = False
    ) -> Any | None:
        """A ``StreamingDataset`` of ``folder``'s shards (only ``indices`` when given;
        ``None`` when that is empty); ``keyed``: in order, images decoded but not
        transformed (for :class:`_KeyedShards`)."""
        from litdata import StreamingDataset
        from litdata.utilities.train_test_split import subset_dataset

        manifest = self._manifest(folder, role)
        if role != "train_dir" and self.has_labels and manifest["classes"] != self.classes:
            raise DataNotFoundError(
                f"{role} classes {manifest['classes']} differ from train_dir classes {self.classes}"
            )
        ds = StreamingDataset(
            str(folder.resolve()),
            shuffle=train and not keyed,
            # The run's seed (seed_everything): shuffles differ per run, as for the folders.
            seed=torch.initial_seed() % 2**31,
            transform=_DecodeSample(None if keyed else self._transform(train), self.has_labels),
        )
        if indices is not None and len(indices) < manifest["num_samples"]:
            if len(indices) == 0:
                return None
            ds = subset_dataset(ds, indices.tolist())
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            n = int(self._manifest(self.train_dir, "train_dir")["num_samples"])
            if self.val_dir is not None:
                if self.train_subset is not None:
                    warn_large_subset(self.train_subset, n)
                train_idx, val_idx = subset(n, self.train_subset, self.seed), None
                val = self._streaming(self.val_dir, "val_dir", False, None)
            else:
                train_idx, val_idx = split_indices(n, self.val_split, self.seed, self.train_subset)
                val = self._streaming(self.train_dir, "train_dir", False, val_idx)
            if self.replay:
                streaming = self._streaming(self.train_dir, "train_dir", True, train_idx, True)
                self.train_set = _KeyedShards(streaming, self._train_transform())
            else:
                self.train_set = self._streaming(self.train_dir, "train_dir", True, train_idx)
            self.val_set = _MapStyle(val)
        if stage in (None, "test", "predict") and self.test_set is None:
            if self.test_dir is None:
                raise DataNotFoundError("no test_dir configured (data.init_args.test_dir)")
            n = int(self._manifest(self.test_dir, "test_dir")["num_samples"])
            idx = subset(n, self.test_subset, self.seed)
            self.test_set = _MapStyle(self._streaming(self.test_dir, "test_dir", False, idx))

    def train_dataloader(self) -> DataLoader:
        if self.replay:
            return self._train_loader(epoch_keys=True)
        from litdata import StreamingDataLoader

        # Streamed batches carry no epoch: mixup/CutMix draw from the workers' streams.
        mixer = self.mixer()
        return StreamingDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=MixupCollate(mixer) if mixer is not None else None,
            drop_last=True if mixer is not None else None,  # None: LitData's default
        )
