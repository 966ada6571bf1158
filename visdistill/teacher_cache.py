"""Teacher-output cache: the teachers run once, before training, instead of every step.

Following FKD (Shen & Xing, ECCV 2022), ``build_teacher_cache`` iterates the data module's own
training loader for ``E`` epochs, so the images the teachers see are exactly the ones training
will see: replayable augmentation (every random draw of sample ``i`` in epoch ``e`` is a
function of the data seed, ``e`` and ``i``), and batch-level mixing (mixup/CutMix, whose
batches are fixed by the epoch's seeded order). Per epoch and sample it stores, per classifier
teacher, the top-``k`` log-probabilities (fp16, or fp32 with ``logits_dtype``) with their
class indices and the log of the remaining probability mass; optionally each teacher's
pooled features (fp16) and fp16 feature maps ``(C, h, w)`` of chosen stages, so feature terms
(ND, UNIC, TRG, AdaptorHeads ...) train from the cache too. Training with ``DistillationModule(teacher_cache=DIR)`` reads them.

Layout of ``DIR``: ``manifest.json`` and, per epoch ``e`` and shard ``s``,
``eEEEE-sSSSSS.head.npy`` (a record per sample: its source ``index`` and the
log-probabilities) plus one ``.npy`` per
stored feature (``...t0-pooled.npy``, ``...t1-stage3.npy``). Samples are stored in the order
the epoch's loader yields them (the order of a single-process batch of ``world_size x
batch_size``), so a training batch is a contiguous run of one shard; lookups go from a batch's
``index`` through the stored order. Shards hold a fixed number of whole batches, independent
of how many processes build the cache.

The manifest records the teachers' fingerprint (names, input specs, weights), the data module
and its hyper-parameters, the augmentation, the batching (batch size, ``drop_last``, training
world size, shuffle seed), ``k``, the stored features and the number of epochs; a run whose
teachers, data or augmentation differ, or that needs a feature the cache lacks, is refused,
naming the difference. The batching is refused only when batches are mixed (mixup/CutMix):
per-sample augmentation is the same whatever the batching. Without augmentation one epoch is
stored and reused for every epoch.

Building: in ``.DIR.building`` beside ``DIR``. Each shard is written under a ``.partial`` name
and renamed when complete, so a killed build resumes from its completed shards (a build whose
setup differs starts over). Under ``torch.distributed`` (e.g. ``torchrun``) each rank builds
every ``world_size``-th shard; the files are the same byte for byte whatever the number of
processes. When every shard is there the manifest is written and the folder moved onto
``DIR``. An existing ``DIR`` is used only when it is empty, or when it holds a cache and
``overwrite`` is given; then only the cache's own files are replaced.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .checkpoints import atomic_write, fsync_folder
from .errors import ConfigError
from .fast_path import leave_fast_path, use_channels_last
from .loader_pass import run_over_loader, stop_workers
from .models import ModelOutput
from .teachers import teacher_fingerprint

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
BUILD_FILE = "build.json"  # a build in progress: what it builds (resumed only if unchanged)
# Every file a cache (or its building folder) holds; nothing else is ever deleted or
# replaced. The first line: format 1's arrays, so an old cache can be overwritten.
_CACHE_FILE = re.compile(
    r"(logp|classes|rest|source_index|pooled\d+)\.npy"
    r"|manifest\.json|build\.json|\.manifest\.json\.[^/]*\.tmp|\.build\.json\.[^/]*\.tmp"
    r"|e\d{4}-s\d{5}\.(head|t\d+-pooled|t\d+-stage\d+)\.npy(\.partial)?"
)
_REBUILD = "rebuild it with `visdistill cache --config <your config> --out <dir> --overwrite`"


# ----------------------------------------------------------------------- identity
def _train_loader_parts(datamodule: Any) -> tuple[DataLoader, Any]:
    """The data module's training loader and its :class:`EpochSampler` (the keys it yields
    fix which augmented image every sample gets), refusing a loader without one."""
    from .data.resumable import _epoch_sampler

    loader = datamodule.train_dataloader()
    sampler = _epoch_sampler(getattr(loader, "sampler", None))
    if sampler is None:
        raise ConfigError(
            f"{type(datamodule).__name__}'s training loader has no epoch-keyed sampler "
            "(visdistill.data.replay.EpochSampler), so its augmented images cannot be replayed "
            "for the teacher cache; use a visdistill data module with replayable augmentation"
        )
    return loader, sampler


def mixes_batches(augmentation: Any) -> bool:
    """Whether the augmentation mixes samples within a batch (mixup/CutMix): then a sample's
    image depends on its batch, and the batching is part of a cache's identity."""
    return isinstance(augmentation, dict) and bool(augmentation.get("mixing"))


def cache_identity(module: Any, datamodule: Any, world_size: int | None = None) -> dict[str, Any]:
    """What a cache must agree on with a run: teachers, data, augmentation, batching.

    ``world_size``: the training run's processes (default: what the data module's training
    loader shards over, 1 outside a distributed run)."""
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    # Loader settings, the test split and LightningCLI's bookkeeping change nothing stored
    # (the batch size, where it matters, is in "batching").
    for key in [k for k in hparams if k.startswith("_")] + [
        "batch_size",
        "num_workers",
        "test_subset",
    ]:
        hparams.pop(key, None)
    augmentation = datamodule.augmentation()  # first: its refusal says how to replay
    loader, sampler = _train_loader_parts(datamodule)
    if world_size is not None and mixes_batches(augmentation):
        # Built in one process for a run of world_size: the batches are that run's.
        augmentation = {**augmentation, "world_size": int(world_size)}
    return {
        "format": FORMAT_VERSION,
        "teachers": teacher_fingerprint(list(module.teachers)),
        "teacher_names": [t.name for t in module.teachers],
        "datamodule": type(datamodule).__qualname__,
        "data_hparams": {k: repr(v) for k, v in sorted(hparams.items())},
        "train_samples": len(datamodule.train_set),
        "augmentation": augmentation,
        "batching": {
            "batch_size": int(loader.batch_size),
            "drop_last": bool(loader.drop_last),
            "world_size": int(world_size or sampler.num_replicas),
            "shuffle_seed": int(sampler.seed),
        },
    }


# ----------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    """Which batches make up each shard of each epoch (the same for any number of builders).

    ``batches[e]`` lists epoch ``e``'s loader batches in slot order (training batch ``t`` of
    rank 0, of rank 1, ..., then batch ``t + 1``); each batch is its list of sampler keys.
    """

    epochs: int
    world_size: int
    batch_size: int
    drop_last: bool
    seed: int
    epoch_keys: bool
    n: int
    shard_batches: int  # loader batches per shard (a multiple of world_size)
    batches: list[list[list[Any]]] = field(default_factory=list)

    def build(self) -> None:
        from .data.replay import EpochSampler

        for e in range(self.epochs):
            per_rank = []
            for r in range(self.world_size):
                order = EpochSampler(self.n, True, self.seed, self.world_size, r).order(e)
                keys = [(e, i) for i in order] if self.epoch_keys else order
                cut = [keys[s : s + self.batch_size] for s in range(0, len(keys), self.batch_size)]
                if self.drop_last and cut and len(cut[-1]) < self.batch_size:
                    cut.pop()
                per_rank.append(cut)
            self.batches.append([b for group in zip(*per_rank, strict=True) for b in group])

    @property
    def slots(self) -> int:
        return sum(len(b) for b in self.batches[0])

    @property
    def shard_slots(self) -> int:
        return self.shard_batches * self.batch_size

    @property
    def shards(self) -> int:
        return max(1, -(-len(self.batches[0]) // self.shard_batches))

    def shard(self, e: int, s: int) -> list[list[Any]]:
        return self.batches[e][s * self.shard_batches : (s + 1) * self.shard_batches]


def _name(e: int, s: int, what: str) -> str:
    return f"e{e:04d}-s{s:05d}.{what}.npy"


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_ranks(step: Callable[[], None], what: str) -> None:
    """Run ``step`` (on the ranks that call with a real step), then agree across ranks on
    whether it failed: every rank raises when any did, so no process is left waiting for a
    failed one at the next collective until the process-group timeout (a launcher other than
    torchrun, such as ``srun`` or ``mp.spawn``, does not stop the others for it)."""
    error: BaseException | None = None
    try:
        step()
    except BaseException as exc:  # re-raised below, after the others heard of it
        error = exc
    rank, world = _dist()
    if world > 1:
        gpu = torch.distributed.get_backend() == "nccl"
        flags = torch.zeros(world, device="cuda" if gpu else "cpu")
        flags[rank] = error is not None
        torch.distributed.all_reduce(flags)
        failed = [r for r in range(world) if flags[r] > 0]
        if failed and error is None:
            raise ConfigError(
                f"the cache build failed in process(es) {failed} while {what} (their error is "
                "in their output); the complete shards are kept: run the same command again "
                "to finish the build"
            )
    if error is not None:
        raise error


def _teacher_stages(module: Any, stages: Any) -> list[tuple[int, ...]]:
    """Per teacher, the stage indices to store (each taken modulo the teacher's stage
    count, so ``-1`` and the last stage are one feature map)."""
    from .teachers import per_teacher_stages

    teachers = list(module.teachers)
    wanted = module.teacher_stages if stages is None else per_teacher_stages(stages, len(teachers))
    out = []
    for teacher, own in zip(teachers, wanted, strict=True):
        teacher.check_stages(own)
        n = len(teacher.feature_info)
        out.append(tuple(sorted({int(s) % n for s in own})))
    return out


# ----------------------------------------------------------------------- building
@torch.no_grad()
def build_teacher_cache(
    module: Any,
    datamodule: Any,
    out: str | os.PathLike,
    epochs: int,
    top_k: int = 10,
    pooled: bool | None = None,
    batch_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
    *,
    stages: list[int] | list[list[int]] | None = None,
    train_world_size: int | None = None,
    shard_size: int = 8192,
    device: str | None = None,
    logits_dtype: str = "float16",
) -> Path:
    """Run the module's teachers over ``epochs`` epochs of the data module's training batches
    and store what the distillation terms read from them.

    The teachers run as in a fit: eval mode, ``no_grad``, in ``channels_last`` memory format
    when the module's ``channels_last`` is on (their default format again afterwards).
    Under ``torch.distributed`` (``torchrun --nproc_per_node N -m visdistill cache ...``)
    every rank builds its share of the shards; a killed build resumes from its completed
    shards when run again with the same setup; a rank that fails makes every rank stop with
    an error that names it.

    Args:
        module: a :class:`DistillationModule` with teachers.
        datamodule: a data module whose training loader replays its augmentation (an
            :class:`~visdistill.data.replay.EpochSampler` with epoch keys), set up for fit.
        out: cache directory: must not exist, be empty, or (with ``overwrite``) hold a
            cache. Built in ``.OUT.building`` beside it, then moved into place.
        epochs: epochs of augmentations to store (>= the runs' ``max_epochs``); ignored
            (1 is stored) when the data module does not augment.
        top_k: classes kept per sample and teacher (the rest share the remaining mass);
            ``k >= num_classes`` stores the exact distribution.
        pooled: also store the teachers' pooled features (fp16), for terms like ND, UNIC and
            AdaptorHeads; default: when the model's terms read them.
        batch_size: the most images the teachers see in one forward (a training batch
            larger than this is split).
        progress: show a progress bar with the remaining time.
        overwrite: replace the cache already in ``out`` (only its own files).
        stages: teacher stages whose feature maps ``(C, h, w)`` to store (fp16): one list of
            stage indices for every teacher, or one list per teacher (``[[3], []]``);
            default: the stages the model's terms read (TRG, UNIC, DisWOT, ...).
        train_world_size: processes of the training run that will read the cache (its
            batches are cut per process); default: 1, or the trainer config's world size
            in ``visdistill cache``. Matters only when batches are mixed (mixup/CutMix).
        shard_size: samples per cache file (rounded to whole training batches); a killed
            build redoes at most one shard per process.
        device: where the teachers run (``cuda``, ``cuda:1``, ``cpu``); default: where the
            model is, or this process's GPU under ``torch.distributed`` with CUDA.
        logits_dtype: ``float16`` (rounds a log-probability to 2^-11 of its size) or
            ``float32`` (exact targets, 2 more bytes per class kept) for the stored
            log-probabilities.
    """
    out = Path(out)
    check_cache_destination(out, overwrite)
    if module.teachers is None:
        raise ConfigError("the teacher cache needs teachers; the model has none")
    if datamodule.train_set is None:
        datamodule.setup("fit")
    if not hasattr(datamodule, "augmentation"):
        raise ConfigError(
            f"{type(datamodule).__name__} has no replayable augmentation; the teacher cache "
            "needs a data module whose augmentation() describes what it replays"
        )
    if int(top_k) < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(shard_size) < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if logits_dtype not in ("float16", "float32"):
        raise ConfigError(f"logits_dtype must be 'float16' or 'float32', got {logits_dtype!r}")
    if train_world_size is not None and int(train_world_size) < 1:
        raise ConfigError(f"train_world_size must be >= 1, got {train_world_size}")
    rank, world = _dist()
    if device is not None:
        module.to(device)
    elif world > 1 and torch.cuda.is_available():
        module.to(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    identity = cache_identity(module, datamodule, train_world_size)
    loader, sampler = _train_loader_parts(datamodule)
    deterministic = identity["augmentation"] is None
    epochs = 1 if deterministic else int(epochs)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    batching = identity["batching"]
    n, w, b = len(datamodule.train_set), batching["world_size"], batching["batch_size"]
    if mixes_batches(identity["augmentation"]) and w > 1 and n % w:
        raise ConfigError(
            f"with mixup/CutMix and {w} training processes, {n} training samples do not "
            f"split evenly: the sampler repeats {w - n % w} sample(s) in another batch, mixed "
            "differently, which one cache entry per sample cannot hold. Use a train_subset "
            f"divisible by {w}"
        )
    classifiers = [i for i, t in enumerate(module.teachers) if not t.headless]
    k_cls = module.teachers.num_classes
    k = min(int(top_k), k_cls) if classifiers else 0
    wanted = _teacher_stages(module, stages)
    if pooled is None:
        pooled = bool(module.needs_pooled)
    if not classifiers and not pooled and not any(wanted):
        raise ConfigError(
            "every teacher is headless (num_classes 0), so there are no class probabilities to "
            "cache; cache their features: --pooled true and/or --stages [<stage index>]"
        )
    plan = _Plan(
        epochs, w, b, batching["drop_last"], batching["shuffle_seed"], bool(sampler.epoch_keys),
        n, w * max(1, round(int(shard_size) / (w * b))),
    )  # fmt: skip
    plan.build()
    contents = {
        "epochs": epochs,
        "deterministic": deterministic,
        "top_k": k,
        "num_classes": k_cls,
        "classifiers": classifiers,
        "pooled": bool(pooled),
        "stages": [list(s) for s in wanted],
        "stage_counts": [len(t.feature_info) for t in module.teachers],
        "feature_dtype": "float16",
        "logits_dtype": logits_dtype,
        "slots_per_epoch": plan.slots,
        "shard_slots": plan.shard_slots,
        "shards_per_epoch": plan.shards,
    }
    description = {**identity, **contents}
    building = out.parent / f".{out.name}.building"
    _all_ranks(
        lambda: _prepare_building(building, description) if rank == 0 else None,
        "preparing the build folder",
    )
    writer = _ShardWriter(building, plan, description, module, int(batch_size))
    todo = [
        (e, s)
        for e in range(epochs)
        for s in range(plan.shards)
        if (e * plan.shards + s) % world == rank and not (building / _name(e, s, "head")).exists()
    ]
    teachers_at = next(module.teachers.parameters()).device
    channels_last = getattr(module, "channels_last", False)
    use_channels_last(module.teachers, teachers_at, channels_last)  # as in a fit
    try:
        _all_ranks(lambda: writer.run(loader, todo, progress and rank == 0), "running the teachers")
    finally:
        stop_workers(loader)  # the loader is this build's own: nothing iterates it again
        leave_fast_path(module.teachers)
    _all_ranks(
        lambda: (
            _finish_build(building, out, description, epochs, plan, overwrite)
            if rank == 0
            else None
        ),
        "finishing the build",
    )
    return out


def _finish_build(
    building: Path,
    out: Path,
    description: dict[str, Any],
    epochs: int,
    plan: _Plan,
    overwrite: bool,
) -> None:
    """Check that every shard is there, write the manifest and move the cache into place."""
    missing = [
        _name(e, s, "head")
        for e in range(epochs)
        for s in range(plan.shards)
        if not (building / _name(e, s, "head")).exists()
    ]
    if missing:
        raise ConfigError(
            f"the cache build in {building} lacks {len(missing)} shard(s) ({missing[0]} ...): "
            "a process of the build failed; run the same command again to finish it"
        )
    description["feature_shapes"] = _feature_shapes(building)
    atomic_write(building / MANIFEST, lambda p: Path(p).write_text(_dumps(description)))
    (building / BUILD_FILE).unlink()
    _move_into_place(building, out, overwrite)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True)


def _prepare_building(building: Path, description: dict[str, Any]) -> None:
    """Create the building folder, or resume the build in it when it builds the same cache;
    a build of anything else there is started over (its files only)."""
    if building.exists() and not building.is_dir():
        raise ConfigError(f"{building} is a file; remove it or choose another --out")
    building.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in building.iterdir() if not _CACHE_FILE.fullmatch(p.name)]
    if foreign:
        raise ConfigError(
            f"{building} (where the cache is built) holds files that are not the cache's "
            f"({', '.join(sorted(foreign)[:3])}); move them away or choose another --out"
        )
    try:
        previous = json.loads((building / BUILD_FILE).read_text())
    except (OSError, ValueError):
        previous = None
    if previous != json.loads(_dumps(description)):
        _remove_cache_files(building)
        atomic_write(building / BUILD_FILE, lambda p: Path(p).write_text(_dumps(description)))


def _feature_shapes(building: Path) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(building.glob("e0000-s00000.t*.npy")):
        what = path.name.split(".")[1]
        shapes[what] = list(np.load(path, mmap_mode="r").shape[1:])
    return shapes


class _ShardWriter:
    """Runs the teachers over the planned batches of this process's shards and writes each
    shard under ``.partial`` names, renamed (the head file last) once complete."""

    def __init__(
        self, folder: Path, plan: _Plan, description: dict[str, Any], module: Any, chunk: int
    ) -> None:
        self.folder, self.plan, self.module, self.chunk = folder, plan, module, chunk
        self.k, self.classifiers = description["top_k"], description["classifiers"]
        self.head_dtype = _head_dtype(len(self.classifiers), self.k, description["logits_dtype"])
        self.pooled, self.stages = description["pooled"], [tuple(s) for s in description["stages"]]
        self.arrays: dict[str, np.memmap] = {}

    def run(self, loader: DataLoader, todo: list[tuple[int, int]], progress: bool) -> None:
        batches = [batch for e, s in todo for batch in self.plan.shard(e, s)]
        if not batches:
            return
        # The training loader's own dataset, collate function and workers, fed the exact
        # key lists of the planned batches.
        replay = DataLoader(
            loader.dataset,
            batch_sampler=batches,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            worker_init_fn=loader.worker_init_fn,
        )
        passes = run_over_loader(
            self.module.teachers,
            replay,
            self._forward,
            device=self.module.device,
            desc="teacher cache",
            progress=progress,
            total=sum(len(b) for b in batches),
        )
        units = iter(todo)
        unit, offset, left = None, 0, 0
        for batch, outs in passes:
            if left == 0:
                unit = next(units)
                offset, left = 0, len(self.plan.shard(*unit))
            self._write(unit, offset, batch, outs)
            offset, left = offset + len(batch["index"]), left - 1
            if left == 0:
                self._finish(unit)

    def _forward(self, teachers: Any, batch: dict[str, Tensor]) -> list[ModelOutput]:
        images, outs = batch["image"], None
        live = self.module.live_teachers
        for start in range(0, len(images), self.chunk):
            with live.autocast(images):
                part = teachers(
                    images[start : start + self.chunk], stages=self.stages, pooled=self.pooled
                )
            outs = part if outs is None else [_cat(a, p) for a, p in zip(outs, part, strict=True)]
        return outs

    def _array(self, unit: tuple[int, int], what: str, shape: tuple[int, ...], dtype: Any):
        key = f"{unit}{what}"
        if key not in self.arrays:
            rows = sum(len(b) for b in self.plan.shard(*unit))
            path = self.folder / (_name(*unit, what) + ".partial")
            self.arrays[key] = np.lib.format.open_memmap(
                path, mode="w+", dtype=dtype, shape=(rows, *shape)
            )
        return self.arrays[key]

    def _write(self, unit, offset: int, batch: dict[str, Tensor], outs: list[ModelOutput]) -> None:
        rows = slice(offset, offset + len(batch["index"]))
        e = unit[0]
        head = self._array(unit, "head", (), self.head_dtype)
        head["index"][rows] = batch["index"].cpu().numpy()
        if self.classifiers:
            logp = torch.stack(
                [outs[i].logits.float().log_softmax(-1) for i in self.classifiers], 1
            )
            if not torch.isfinite(logp).all():
                raise ConfigError(
                    f"a teacher gave NaN/inf outputs in epoch {e} of the cache build; nothing "
                    "was written to the cache folder. Check the data (NaN pixels) and the teachers"
                )
            top, idx = logp.topk(self.k, dim=-1)
            top = top.clamp(min=-6e4)  # p ~ 0 stays finite in float16
            rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
            head["logp"][rows] = top.cpu().numpy()
            head["classes"][rows] = idx.cpu().numpy().astype(np.int16)
            head["rest"][rows] = rest.cpu().numpy()
        for i, o in enumerate(outs):
            features = [("pooled", o.pooled)] if self.pooled else []
            features += [(f"stage{s}", o.stages[s]) for s in self.stages[i]]
            for what, value in features:
                array = value.float().cpu().numpy().astype(np.float16)
                if not np.isfinite(array).all():
                    raise ConfigError(
                        f"teacher {i}'s {what} features are NaN/inf or exceed float16 "
                        f"(|x| > 65504) in epoch {e}; the cache cannot store them"
                    )
                self._array(unit, f"t{i}-{what}", array.shape[1:], np.float16)[rows] = array

    def _finish(self, unit: tuple[int, int]) -> None:
        prefix = f"{unit}"
        names = sorted((k for k in self.arrays if k.startswith(prefix)), key=lambda k: "head" in k)
        for key in names:
            array = self.arrays.pop(key)
            array.flush()
            path = Path(array.filename)
            del array
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(path, path.with_suffix(""))  # drop ".partial"
        fsync_folder(self.folder)


def _cat(a: ModelOutput, b: ModelOutput) -> ModelOutput:
    def cat(x, y):
        return None if x is None else torch.cat([x, y])

    return ModelOutput(
        logits=cat(a.logits, b.logits),
        pooled=cat(a.pooled, b.pooled),
        stages={s: torch.cat([v, b.stages[s]]) for s, v in a.stages.items()},
    )


def _head_dtype(classifiers: int, k: int, logits_dtype: str) -> np.dtype:
    fields: list[tuple[Any, ...]] = [("index", "<i8")]
    f = "<f2" if logits_dtype == "float16" else "<f4"
    if classifiers:
        fields += [
            ("logp", f, (classifiers, k)),
            ("classes", "<i2", (classifiers, k)),
            ("rest", f, (classifiers,)),
        ]
    return np.dtype(fields)


# ----------------------------------------------------------------------- destination
def check_cache_destination(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, a non-empty folder that is not a teacher cache, or
    a cache without ``overwrite``: a cache build never deletes what it did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not _is_cache_folder(out):
        raise ConfigError(
            f"--out {out} is a non-empty folder that is not a visdistill teacher cache (no "
            f"{MANIFEST}); nothing was written. Choose a new or empty folder for the cache"
        )
    if not overwrite:
        raise ConfigError(
            f"--out {out} already holds a teacher cache; pass --overwrite to replace it (only "
            "the cache's own files are replaced), or choose another --out"
        )


def _is_cache_folder(folder: Path) -> bool:
    """A folder with a manifest, or (a replacement interrupted by a crash) cache files only."""
    names = [p.name for p in folder.iterdir()]
    return MANIFEST in names or all(_CACHE_FILE.fullmatch(n) for n in names)


def _remove_cache_files(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and _CACHE_FILE.fullmatch(path.name):
                path.unlink()


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the built cache onto ``out``; into an existing cache folder file by file, the
    old manifest removed first and the new one moved last, so no reader ever sees a manifest
    with another cache's arrays."""
    check_cache_destination(out, overwrite)  # again: the folder may have changed meanwhile
    if not out.exists():
        os.replace(tmp, out)
        return
    (out / MANIFEST).unlink(missing_ok=True)
    _remove_cache_files(out)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(path, out / path.name)
    fsync_folder(out)
    if not any(tmp.iterdir()):
        tmp.rmdir()


# ----------------------------------------------------------------------- reading
def _load_array(path: Path, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """Memory-map ``path/name``, refusing a missing, truncated or misshapen file."""
    file = path / name
    try:
        array = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise ConfigError(f"teacher cache {path} lacks {name}; {_REBUILD}") from None
    except (ValueError, OSError, EOFError) as e:  # truncated: "mmap length is greater ..."
        raise ConfigError(
            f"teacher cache {path}: {name} is truncated or damaged ({e}); {_REBUILD}"
        ) from None
    if len(array.shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        raise ConfigError(
            f"teacher cache {path}: {name} has shape {array.shape}, its manifest says "
            f"{tuple('*' if d is None else d for d in shape)}; {_REBUILD}"
        )
    return array


@dataclass
class TeacherCache:
    """A built cache opened for reading (shards memory-mapped on first use)."""

    path: Path
    manifest: dict[str, Any]
    _maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _orders: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TeacherCache:
        """Open the cache in ``path``: checks the manifest and every file's presence, shape
        and fields. Values (finite log-probabilities and features, classes in range) are
        checked as they are read, so opening reads no data: at ImageNet scale the heads of
        every epoch are tens of gigabytes."""
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise ConfigError(
                f"teacher cache not found: {manifest_file}; build it with "
                "`visdistill cache --config <your config> --out <dir>`"
            )
        try:
            manifest = json.loads(manifest_file.read_text())
            if manifest.get("format") != FORMAT_VERSION:
                raise ConfigError(
                    f"teacher cache {path} has format {manifest.get('format')}, this visdistill "
                    f"reads format {FORMAT_VERSION}; {_REBUILD}"
                )
            shards, epochs = manifest["shards_per_epoch"], manifest["epochs"]
            (
                manifest["slots_per_epoch"],
                manifest["shard_slots"],
                manifest["feature_shapes"],
                manifest["logits_dtype"],
                manifest["num_classes"],
            )
            n_cls, k = len(manifest["classifiers"]), manifest["top_k"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"teacher cache {path}: {MANIFEST} is damaged ({type(e).__name__}: {e}); {_REBUILD}"
            ) from None
        cache = cls(path, manifest)
        for e in range(epochs):
            for s in range(shards):
                rows = cache._rows(s)
                head = _load_array(path, _name(e, s, "head"), (rows,))
                if head.dtype != _head_dtype(n_cls, k, manifest["logits_dtype"]):
                    raise ConfigError(
                        f"teacher cache {path}: {_name(e, s, 'head')} holds other fields "
                        f"({head.dtype}) than its manifest says; {_REBUILD}"
                    )
                for what, shape in manifest["feature_shapes"].items():
                    _load_array(path, _name(e, s, what), (rows, *shape))
        return cache

    def _check_head(self, head: np.ndarray, ep: np.ndarray, shard: np.ndarray) -> None:
        """Refuse log-probabilities that are not finite and classes out of range, naming the
        files they were read from."""

        def files() -> str:  # only on failure: this runs for every batch read
            names = {_name(int(e), int(s), "head") for e, s in zip(ep, shard, strict=True)}
            return ", ".join(sorted(names))

        for name in ("logp", "rest"):
            bad = int((~np.isfinite(head[name])).sum())
            if bad:
                raise ConfigError(
                    f"teacher cache {self.path}: {files()} hold(s) {bad} NaN/inf "
                    f"{name} value(s): the file is damaged or the teachers gave non-finite "
                    f"outputs; {_REBUILD}"
                )
        classes, k_cls = head["classes"], self.manifest["num_classes"]
        if classes.size and (classes.min() < 0 or classes.max() >= k_cls):
            raise ConfigError(
                f"teacher cache {self.path}: {files()} hold(s) class "
                f"{int(classes.min() if classes.min() < 0 else classes.max())}, outside "
                f"0..{k_cls - 1}: the file is damaged; {_REBUILD}"
            )

    def _rows(self, shard: int) -> int:
        m = self.manifest
        last = m["slots_per_epoch"] - (m["shards_per_epoch"] - 1) * m["shard_slots"]
        return last if shard == m["shards_per_epoch"] - 1 else m["shard_slots"]

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            self._maps[name] = np.load(self.path / name, mmap_mode="r")
        return self._maps[name]

    def _slot_of(self, epoch: int) -> np.ndarray:
        """Source index -> slot in ``epoch`` (``-1``: not in that epoch)."""
        if epoch not in self._orders:
            order = np.concatenate(
                [
                    np.asarray(self._map(_name(epoch, s, "head"))["index"])
                    for s in range(self.manifest["shards_per_epoch"])
                ]
            )
            slot_of = np.full(int(order.max(initial=0)) + 1, -1, dtype=np.int64)
            slot_of[order] = np.arange(len(order))
            self._orders[epoch] = slot_of
            while len(self._orders) > 2:  # the current epoch and the next suffice
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def check(
        self, module: Any, datamodule: Any, max_epochs: int | None, world_size: int | None = None
    ) -> None:
        """Refuse a cache built for other teachers, data, augmentation or (with mixup)
        batching, or for too few epochs."""
        current = cache_identity(module, datamodule, world_size)
        if not mixes_batches(current["augmentation"]):
            current.pop("batching")
        diffs = [
            f"{key}: cache has {self.manifest.get(key)!r}, this run has {value!r}"
            for key, value in current.items()
            if self.manifest.get(key) != value
        ]
        if diffs:
            raise ConfigError(
                f"teacher cache {self.path} was built for another setup ({'; '.join(diffs)}). "
                "Rebuild it with `visdistill cache --config <this config> --out <dir> --overwrite`"
            )
        epochs = self.manifest["epochs"]
        if not self.manifest["deterministic"] and max_epochs is not None and max_epochs > epochs:
            raise ConfigError(
                f"teacher cache {self.path} holds {epochs} epochs of augmentations but the run "
                f"trains {max_epochs}; rebuild with --epochs {max_epochs} --overwrite"
            )

    def check_contents(
        self, stages: Sequence[Sequence[int]], needs_pooled: bool, names: Sequence[str]
    ) -> None:
        """Refuse a cache that lacks pooled features or a stage the terms read."""
        missing_stages(self.manifest, self.path, stages, needs_pooled, names)

    def lookup(self, epoch: int | Tensor, index: Tensor, device: Any = None) -> list[ModelOutput]:
        """Teacher outputs for the samples ``index`` ``(B,)`` in ``epoch`` (one epoch for all,
        or one per sample ``(B,)``): one :class:`ModelOutput` per teacher, ``logits`` being
        log-probabilities ``(B, K)`` (``None`` for a headless teacher), ``pooled`` ``(B, D)``
        and ``stages`` ``{stage: (B, C, h, w)}`` as stored (float32)."""
        m = self.manifest
        epochs, n_batch = m["epochs"], len(index)
        if m["deterministic"]:
            ep = np.zeros(n_batch, dtype=np.int64)
        elif isinstance(epoch, Tensor) and epoch.ndim:
            ep = epoch.cpu().numpy().astype(np.int64)
        else:
            ep = np.full(n_batch, int(epoch), dtype=np.int64)
        if n_batch and not m["deterministic"] and not (0 <= ep.min() <= ep.max() < epochs):
            raise ConfigError(
                f"teacher cache {self.path} holds epochs 0..{epochs - 1}, asked for epoch "
                f"{ep.max() if ep.max() >= epochs else ep.min()}; rebuild it with "
                "--epochs <the run's max_epochs> --overwrite"
            )
        idx = index.cpu().numpy().astype(np.int64)
        slots = np.empty(n_batch, dtype=np.int64)
        for e in np.unique(ep):
            sel = ep == e
            slot_of = self._slot_of(int(e))
            found = np.where(
                idx[sel] < len(slot_of), slot_of[np.minimum(idx[sel], len(slot_of) - 1)], -1
            )
            slots[sel] = found
        if (slots < 0).any():
            raise ConfigError(
                f"teacher cache {self.path} has no entry for sample(s) "
                f"{idx[slots < 0].tolist()[:5]} in epoch(s) {sorted(set(ep[slots < 0].tolist()))}"
            )
        shard, row = np.divmod(slots, m["shard_slots"])
        n_cls, k, k_cls = len(m["classifiers"]), m["top_k"], m["num_classes"]
        n_teachers = len(m["teacher_names"])
        head = _gather(self, ep, shard, row, "head")
        features: dict[str, np.ndarray] = {
            what: _gather(self, ep, shard, row, what) for what in m["feature_shapes"]
        }
        for what, values in features.items():
            if not np.isfinite(values).all():
                raise ConfigError(
                    f"teacher cache {self.path}: {what} features of epoch(s) "
                    f"{sorted(set(ep.tolist()))} hold NaN/inf: the file is damaged; {_REBUILD}"
                )
        logits: dict[int, Tensor] = {}
        if n_cls:
            self._check_head(head, ep, shard)
            logp = torch.from_numpy(head["logp"].astype(np.float32))
            classes = torch.from_numpy(head["classes"].astype(np.int64))
            rest = torch.from_numpy(head["rest"].astype(np.float32))
            # Non-top-k classes share the remaining mass equally.
            fill = rest - np.log(max(k_cls - k, 1))
            full = fill.unsqueeze(-1).expand(*rest.shape, k_cls).clone()
            full.scatter_(-1, classes, logp)
            logits = {t: full[:, j].to(device) for j, t in enumerate(m["classifiers"])}

        def feature(what: str) -> Tensor | None:
            if what not in features:
                return None
            # Moved as stored (fp16: half the bytes to a GPU), then widened where it lands.
            return torch.from_numpy(features[what]).to(device).float()

        return [
            ModelOutput(
                logits=logits.get(i),
                pooled=feature(f"t{i}-pooled"),
                stages={s: feature(f"t{i}-stage{s}") for s in m["stages"][i]},
            )
            for i in range(n_teachers)
        ]


def _gather(cache: TeacherCache, ep: np.ndarray, shard: np.ndarray, row: np.ndarray, what: str):
    """The stored ``what`` of every sample ``(epoch, shard, row)``, in the batch's order; one
    contiguous read when the batch is one run of one shard (a training batch is)."""
    groups = sorted({(int(a), int(b)) for a, b in zip(ep, shard, strict=True)})
    if len(groups) == 1:
        array = cache._map(_name(*groups[0], what))
        lo, hi = int(row.min()), int(row.max()) + 1
        if hi - lo == len(row) and (np.diff(row) == 1).all():
            return np.array(array[lo:hi])  # a training batch: one sequential read
        return np.asarray(array[row])
    out = None
    for e, s in groups:
        sel = (ep == e) & (shard == s)
        values = np.asarray(cache._map(_name(e, s, what))[row[sel]])
        if out is None:
            out = np.empty((len(row), *values.shape[1:]), dtype=values.dtype)
        out[sel] = values
    return out


def missing_stages(
    manifest: dict[str, Any],
    path: Path | str,
    stages: Sequence[Sequence[int]],
    needs_pooled: bool,
    names: Sequence[str],
) -> None:
    """Refuse, naming what is missing, a cache without the pooled features or a stage of a
    teacher that the run's terms read (``stages``: per teacher, the indices they read)."""
    if needs_pooled and not manifest["pooled"]:
        raise ConfigError(
            f"a term reads pooled teacher features but the teacher cache {path} has none; "
            "rebuild it with --pooled --overwrite"
        )
    for i, own in enumerate(stages):
        stored = manifest["stages"][i]
        depth = manifest["stage_counts"][i]
        for s in own:
            if depth == 0 or s % depth not in stored:
                raise ConfigError(
                    f"a term reads stage {s} of teacher {names[i]}, but the teacher cache {path} "
                    f"holds {'stages ' + str(stored) if stored else 'no stages'} of it; rebuild "
                    "it with --overwrite (the model's terms' stages are stored by default, or "
                    "give --stages)"
                )
