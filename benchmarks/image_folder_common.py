"""What ``image_folder_path.py`` and ``image_folder_kd.py`` share: the 64 px Fashion-MNIST
PNG folder, its augmentation (timm RandomResizedCrop + RandAugment, then mixup/CutMix), the
three zoo teachers, the student, and the run's machine facts.

``configs/kd_image_folder_cached.yaml`` holds the same recipe for the command line (a test
checks that they agree).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch

from visdistill import KD, DistillationModule, ImageFolderDataModule, ModelConfig
from visdistill.data.fashion_mnist_folder import write_fashion_mnist_folder

SIZE = 64
STUDENT = "mobilenetv3_small_050"  # the quickstart's student
TEACHERS = ["zoo:fmnist_resnet10t", "zoo:fmnist_vit_tiny_p8", "zoo:fmnist_convnext_atto"]
NUM_CLASSES = 10
# timm's create_transform options: RandomResizedCrop (area 0.3-1: the 64 px items stay
# recognisable), horizontal flip, RandAugment; no colour jitter (timm skips it under
# RandAugment) and no random erasing.
AUGMENT: dict[str, Any] = dict(scale=(0.3, 1.0), hflip=0.5, auto_augment="rand-m9-mstd0.5")
# DeiT's mixup/CutMix: one of the two per batch, chosen with probability 0.5.
MIX: dict[str, Any] = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5)
TEMPERATURE = 4.0
FKD_EPOCH_S = {"fkd": 486.8, "vanilla": 579.4}  # Shen & Xing, ECCV 2022: ResNet-50, ImageNet


def default_folder() -> Path:
    """Where the PNG folders are kept between runs: ``$VISDISTILL_CACHE/benchmarks``
    (default ``~/.cache/visdistill/benchmarks``)."""
    root = os.environ.get("VISDISTILL_CACHE") or "~/.cache/visdistill"
    return Path(root).expanduser() / "benchmarks"


def prepare_folder(parent: Path, train: int, val: int) -> tuple[Path, float]:
    """The folder ``parent/fashion_mnist_64px_<train>_<val>`` with ``train/<class>/`` (the
    first ``train`` Fashion-MNIST training images) and ``val/<class>/`` (the first ``val``
    test-split images), written on first use and reused afterwards; the seconds spent
    writing it (0 when reused).

    Written under a hidden ``.partial-<pid>`` name and renamed when complete, so a killed
    run never leaves a folder that a later run would take as complete."""
    final = parent / f"fashion_mnist_{SIZE}px_{train}_{val}"
    if (final / "train").is_dir() and (final / "val").is_dir():
        return final, 0.0
    partial = parent / f".{final.name}.partial-{os.getpid()}"
    start = time.perf_counter()
    write_fashion_mnist_folder(partial / "train", train, size=SIZE)
    write_fashion_mnist_folder(partial / "val", val, train=False, size=SIZE)
    for split in ("train", "val"):
        # ImageFolder numbers the classes it finds: a split without a class would shift the
        # labels of the others against the teachers' (and the other split's) class indices.
        found = sorted(p.name for p in (partial / split).iterdir())
        if found != [str(c) for c in range(NUM_CLASSES)]:
            raise ValueError(
                f"the first {train if split == 'train' else val} images of the {split} split "
                f"hold classes {found}, not all {NUM_CLASSES}: write more images (at least 24 "
                f"training and 20 test images cover every class); {partial} can be deleted"
            )
    os.replace(partial, final)
    return final, time.perf_counter() - start


def png_bytes_per_image(folder: Path) -> float:
    """Mean size of the PNG files under ``folder`` (bytes)."""
    sizes = [p.stat().st_size for p in folder.rglob("*.png")]
    return sum(sizes) / max(len(sizes), 1)


def data_module(
    folder: Path,
    batch_size: int,
    train_subset: int | None = None,
    workers: int = 0,
    test: bool = False,
) -> ImageFolderDataModule:
    """The augmented training data of ``folder/train`` (no validation split; with
    ``test``, ``folder/val`` is the test split), set up for fit."""
    dm = ImageFolderDataModule(
        train_dir=str(folder / "train"),
        test_dir=str(folder / "val") if test else None,
        image_size=SIZE,
        batch_size=batch_size,
        val_split=0,
        train_subset=train_subset,
        num_workers=workers,
        **AUGMENT,
        **MIX,
    )
    dm.setup("fit")
    return dm


def distillation_module(
    teachers: bool,
    cache: str | None = None,
    lr: float = 3e-3,
    epochs: int | None = None,
) -> DistillationModule:
    """The student alone (cross-entropy on the mixed soft targets), or with the three
    teachers and Hinton KD at T = 4 (live, or read from ``cache``); AdamW (``lr``, weight
    decay 0.05), cosine schedule over ``epochs`` when given. Teachers are not evaluated in
    validation and test (``eval_teachers: false``)."""
    return DistillationModule(
        student=ModelConfig(STUDENT, num_classes=NUM_CLASSES),
        teachers=[ModelConfig(t) for t in TEACHERS] if teachers else [],
        terms=[KD(temperature=TEMPERATURE)] if teachers else [],
        eval_teachers=False,
        teacher_cache=cache,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
        if epochs
        else None,
    )


def trainer(max_epochs: int, callbacks: list[L.Callback] | None = None, **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer without validation, checkpoints or logger."""
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks or [],
        **kwargs,
    )


def machine() -> dict[str, Any]:
    """Versions, cores, threads and the load average now (1, 5, 15 minutes)."""
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": L.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def command(script: str, argv: list[str] | None) -> str:
    """The command line of this run: ``python benchmarks/<script> <argv>`` (``argv``:
    the arguments given to ``main``, else the process's own)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args])


def quiet_lightning() -> None:
    """Drop Lightning's per-Trainer info lines (devices, ...) and its warning about loaders
    without workers (``--workers 0`` is the benchmarks' choice): a benchmark prints its own."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
