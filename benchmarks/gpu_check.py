"""GPU readiness check: training images/s of a student alone, with live teachers and with a
teacher cache, and the loss difference the fast paths (bf16 teachers, ``channels_last``,
``torch.compile``) make against plain fp32.

Run on a machine with one CUDA GPU (sized for at most 5 minutes; not yet run on a GPU):

    python benchmarks/gpu_check.py

and report the table it prints and ``benchmarks/results/gpu_check.json`` (written
atomically): the images/s of the three variants, their step-time ratios against the
student-only step measured in the same run, the cache build's images/s, the data loader's
images/s measured alone (when it is close to the student-only figure, that figure is bound
by data loading, not by the GPU), the warm-up seconds (compilation), peak GPU memory,
whether ``channels_last`` and compilation were in effect, and the loss-parity numbers
(``max_abs_total``, ``max_rel_total`` and per loss part). Any ``error`` field in the JSON is
a failure of a path that has never run on a GPU: report it verbatim.

What runs: a :class:`~visdistill.DistillationModule` fit under a Lightning ``Trainer``
(1 GPU, ``bf16-mixed``), one epoch of ``--warmup + --steps`` steps of batch
``--batch-size`` on generated 224 px images (1000 classes; no download, no model hub: all
models are timm architectures with ``pretrained: false``):

- ``student_only``: the student (``resnet18``) with cross-entropy, no teachers;
- ``live``: plus three live teachers (``resnet50``, ``vit_small_patch16_224``,
  ``convnext_tiny``), each at its own input size, Hinton KD (T = 4), teachers under bf16
  autocast (``teacher_precision: auto``);
- ``cached``: the same, the teachers' top-10 log-probabilities read from a teacher cache
  built first (``visdistill.teacher_cache.build_teacher_cache``) instead of running them.

All three with ``channels_last: true`` and ``compile: true`` (inductor). Images/s are timed
from the first step after ``--warmup`` to the end of the last (CUDA synchronised at both
ends), so compilation is outside the timed steps; ratios are step times against the
student-only step (``live`` 3.0 means a live step costs 3 student-only steps).

Loss parity: ``--parity-batches`` training batches go through the KD module twice with the
same weights: fp32 everything (no compile, no ``channels_last``, fp32 teachers), and the
fast path as timed (bf16 teachers, ``channels_last``, compiled, student under bf16
autocast); the JSON has the largest absolute and relative difference of the total loss and
of each part (``ce``, ``kd``). A second row compares the cached targets (top-10, fp16) with
the live fp32 teachers on the same batches.

``--smoke`` runs the same code on the CPU in seconds (64 px, tiny models, 2 timed steps, no
compile) and writes its JSON to a temporary file unless ``--out`` is given: it checks the
script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F

from visdistill import KD, DistillationModule, ModelConfig
from visdistill.checkpoints import atomic_write
from visdistill.data.base import ArrayDataModule
from visdistill.fast_path import apply_fast_path
from visdistill.teacher_cache import build_teacher_cache
from visdistill.teacher_source import CachedTeachers

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
BUDGET_S = 300.0  # what the check should take on one GPU
VARIANTS = ("student_only", "live", "cached")

FULL = {
    "image_size": 224,
    "num_classes": 1000,
    "student": "resnet18",
    "teachers": ["resnet50", "vit_small_patch16_224", "convnext_tiny"],
    "teacher_kwargs": [{}, {}, {}],
    "batch_size": 64,
    "warmup": 5,
    "steps": 30,
    "parity_batches": 4,
}
SMOKE = {
    "image_size": 64,
    "num_classes": 10,
    "student": "resnet10t",
    "teachers": ["resnet10t", "vit_tiny_patch16_224", "convnext_atto"],
    # The ViT teacher at 64 px (4 x 4 patches) keeps the smoke run fast.
    "teacher_kwargs": [{}, {"img_size": 64}, {}],
    "batch_size": 8,
    "warmup": 1,
    "steps": 2,
    "parity_batches": 2,
}


_GENERATED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class GeneratedImages(ArrayDataModule):
    """Smooth random colour images ``(N, 3, S, S)`` (uint8) with random labels, generated
    from a seed: the speed of a step does not depend on what the pictures show."""

    def __init__(self, samples: int, classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples, self.num_classes = samples, classes

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.samples, self.image_size, self.num_classes, self.seed, train)
        if key not in _GENERATED:  # every variant reads the same images: generate them once
            _GENERATED[key] = self._generate(train)
        return _GENERATED[key]

    def _generate(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + (0 if train else 1))
        n, side, chunks = self.samples, self.image_size, []
        for start in range(0, n, 256):  # chunked: 224 px floats for all images are GBs
            coarse = torch.rand(min(256, n - start), 3, 14, 14, generator=g)
            fine = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
            chunks.append(fine.mul_(255).round_().to(torch.uint8))
        return torch.cat(chunks), torch.randint(0, self.num_classes, (n,), generator=g)


def _data(args: argparse.Namespace) -> GeneratedImages:
    dm = GeneratedImages(
        samples=args.batch_size * (args.warmup + args.steps),
        classes=args.num_classes,
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_size=args.image_size,
        val_split=0,
    )
    dm.setup("fit")
    return dm


def _module(
    args: argparse.Namespace,
    teachers: bool,
    *,
    cache: str | None = None,
    teacher_precision: str = "auto",
    fast: bool = True,
) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student=ModelConfig(args.student, num_classes=args.num_classes),
        teachers=[
            ModelConfig(name, num_classes=args.num_classes, model_kwargs=kwargs)
            for name, kwargs in zip(args.teachers, args.teacher_kwargs, strict=True)
        ]
        if teachers
        else [],
        terms=[KD(temperature=4.0)] if teachers else [],
        eval_teachers=False,
        teacher_cache=cache,
        teacher_precision=teacher_precision,
        channels_last=fast,
        compile=args.compile if fast else False,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step, and from
    the start of fit to the start of step ``warmup`` (warm-up: compilation, cuDNN search)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.steps = warmup, 0, 0
        self.fit_start = self.start = self.end = 0.0

    def on_fit_start(self, trainer, module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync(module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.images, self.steps = self.images + len(batch["target"]), self.steps + 1
        if batch_idx == trainer.num_training_batches - 1:
            _sync(module.device)
            self.end = time.perf_counter()
            # The fast path's effect, read from the trained module itself.
            weight = next(p for p in module.student.parameters() if p.ndim == 4)
            self.channels_last = weight.is_contiguous(memory_format=torch.channels_last)
            self.compiled = getattr(module.student, "_compiled_call_impl", None) is not None


def _fit(args: argparse.Namespace, module: DistillationModule, root: str) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = _StepTimer(args.warmup)
    L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=root,
    ).fit(module, _data(args))
    if timer.steps == 0:
        raise RuntimeError("no timed step ran (is --steps at least 1?)")
    elapsed = timer.end - timer.start
    result = {
        "images_per_s": timer.images / elapsed,
        "ms_per_step": 1e3 * elapsed / timer.steps,
        "timed_steps": timer.steps,
        "warmup_s": timer.start - timer.fit_start,
        "channels_last": timer.channels_last,
        "compiled": timer.compiled,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _loader_speed(args: argparse.Namespace) -> dict[str, float]:
    """Images/s of the training loader alone (augmentation, collation, workers)."""
    loader = _data(args).train_dataloader()
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch["target"])
    return {"images_per_s": images / (time.perf_counter() - start)}


def _build_cache(args: argparse.Namespace, path: str) -> dict[str, float]:
    builder = _module(args, teachers=True, fast=False).to(args.device)
    data = _data(args)
    _sync(torch.device(args.device))
    start = time.perf_counter()
    build_teacher_cache(builder, data, path, epochs=1, top_k=args.top_k, progress=False)
    _sync(torch.device(args.device))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(data.train_set) / seconds}


def _differences(ref: list[dict[str, float]], other: list[dict[str, float]]) -> dict[str, Any]:
    """Largest absolute and relative difference per loss part over the batches."""
    by_part: dict[str, dict[str, float]] = {}
    for a, b in zip(ref, other, strict=True):
        for key in a:
            absolute = abs(a[key] - b[key])
            relative = absolute / max(abs(a[key]), 1e-12)
            entry = by_part.setdefault(key, {"max_abs": 0.0, "max_rel": 0.0})
            entry["max_abs"] = max(entry["max_abs"], absolute)
            entry["max_rel"] = max(entry["max_rel"], relative)
    return {
        "max_abs_total": by_part["total"]["max_abs"],
        "max_rel_total": by_part["total"]["max_rel"],
        "by_part": by_part,
        "reference_total": [r["total"] for r in ref],
    }


def _losses(module: DistillationModule, batches: list[dict], autocast: bool) -> list[dict]:
    """The module's loss and its parts on each batch, in training mode (the path a training
    step takes; the student's BatchNorm uses batch statistics), without an update."""
    module.train()
    device = torch.device(module.device)
    rows = []
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            total, parts, _ = module.compute_losses(batch)
        rows.append(
            {"total": float(total.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        )
    return rows


def _loss_parity(args: argparse.Namespace, cache: str | None) -> dict[str, Any]:
    device = torch.device(args.device)
    data = _data(args)
    batches = []
    for batch in data.train_dataloader():  # epoch 0's augmentation: what the cache holds
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == args.parity_batches:
            break
    reference = _module(args, teachers=True, teacher_precision="32", fast=False).to(device)
    ref_rows = _losses(reference, batches, autocast=False)
    fast = _module(args, teachers=True, teacher_precision="bf16")
    fast.load_state_dict(reference.state_dict())
    fast.to(device)
    apply_fast_path(fast, device, fast.student, fast.teachers, True, args.compile)
    fast_rows = _losses(fast, batches, autocast=args.precision.startswith("bf16"))
    result: dict[str, Any] = {
        "batches": len(batches),
        "fast_vs_fp32": {
            "what": "bf16 teachers, channels_last, "
            + ("compiled, " if args.compile else "")
            + (
                "student under bf16 autocast"
                if args.precision.startswith("bf16")
                else "fp32 student"
            )
            + " vs fp32 throughout",
            **_differences(ref_rows, fast_rows),
        },
    }
    if cache is not None:
        reference.train_teachers = CachedTeachers.open(cache, reference, data, 1)
        cached_rows = _losses(reference, batches, autocast=False)
        result["cached_vs_live_fp32"] = {
            "what": f"teacher cache (top-{args.top_k}, fp16) vs live fp32 teachers",
            **_differences(ref_rows, cached_rows),
        }
    return result


def _error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": L.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; a failing part records its ``error`` and the others still run."""
    t0 = time.perf_counter()
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "smoke": args.smoke,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "device_given")},
        "environment": _environment(device),
        "variants": {},
        "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cache: str | None = str(Path(tmp) / "cache")
        steps = {
            "loader": lambda: _loader_speed(args),
            "cache_build": lambda: _build_cache(args, cache),
            "student_only": lambda: _fit(args, _module(args, teachers=False), tmp),
            "live": lambda: _fit(args, _module(args, teachers=True), tmp),
            "cached": lambda: _fit(args, _module(args, teachers=True, cache=cache), tmp),
            "loss_parity": lambda: _loss_parity(args, cache),
        }
        for name, step in steps.items():
            if name == "cached" and "cache_build" in report["errors"]:
                report["errors"][name] = "skipped: the cache build failed"
                continue
            print(f"[{time.perf_counter() - t0:6.1f} s] {name} ...", flush=True)
            try:
                value = step()
            except Exception as e:  # a GPU path that fails is a finding: record, go on
                report["errors"][name] = _error(e)
                print(f"  failed: {report['errors'][name]}", flush=True)
                if name == "cache_build":
                    cache = None
                continue
            if name in VARIANTS:
                report["variants"][name] = value
            else:
                report[name] = value
    base = report["variants"].get("student_only")
    report["step_time_vs_student_only"] = {
        name: base["images_per_s"] / v["images_per_s"]
        for name, v in report["variants"].items()
        if base is not None
    }
    report["elapsed_s"] = time.perf_counter() - t0
    report["within_budget"] = args.smoke or report["elapsed_s"] <= BUDGET_S
    return report


def _print(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\n{env.get('gpu', env['device'])}, torch {env['torch']}, timm {env['timm']}")
    cfg = report["config"]
    print(
        f"{cfg['image_size']} px, batch {cfg['batch_size']}, student {cfg['student']}, teachers "
        f"{', '.join(cfg['teachers'])}; precision {cfg['precision']}, compile {cfg['compile']}"
    )
    print(f"{'variant':<14} {'img/s':>9} {'ms/step':>9} {'x student':>10} {'warm-up s':>10}")
    ratios = report["step_time_vs_student_only"]
    for name, v in report["variants"].items():
        print(
            f"{name:<14} {v['images_per_s']:9.1f} {v['ms_per_step']:9.2f} "
            f"{ratios.get(name, math.nan):10.3f} {v['warmup_s']:10.1f}"
        )
    if "loader" in report:
        print(f"loader alone: {report['loader']['images_per_s']:.1f} img/s")
    if "cache_build" in report:
        build = report["cache_build"]
        print(f"cache build: {build['images_per_s']:.1f} img/s ({build['seconds']:.1f} s)")
    for key, row in report.get("loss_parity", {}).items():
        if isinstance(row, dict):
            print(
                f"loss parity {key}: max |diff| {row['max_abs_total']:.3g} "
                f"(relative {row['max_rel_total']:.3g}) over {report['loss_parity']['batches']} "
                "batches"
            )
    for name, message in report["errors"].items():
        print(f"ERROR {name}: {message}")
    print(f"total {report['elapsed_s']:.1f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--parity-batches", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=10, help="classes kept by the cache")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile student and teachers (default: on for CUDA, off on the CPU)",
    )
    parser.add_argument(
        "--precision", default=None, help="Trainer precision (default: bf16-mixed on CUDA, else 32)"
    )
    parser.add_argument("--workers", type=int, default=None, help="data loader workers")
    parser.add_argument("--out", default=None, help=f"JSON file (default: {RESULTS})")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.device_given = args.device is not None
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    cuda = args.device.startswith("cuda")
    if args.compile is None:
        args.compile = cuda
    if args.precision is None:
        args.precision = "bf16-mixed" if cuda else "32"
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if cuda else 0
    if args.out is None:
        # A smoke run's numbers say nothing about a GPU: never in the results folder.
        args.out = (
            str(Path(tempfile.gettempdir()) / "visdistill_gpu_check_smoke.json")
            if args.smoke
            else str(RESULTS)
        )
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1 or args.parity_batches < 1:
        parser.error("--warmup, --steps, --batch-size and --parity-batches must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not args.device.startswith("cuda") and not args.device_given:
        print(
            "no CUDA device: the full check measures a GPU. Use --smoke for a quick CPU check "
            "of the script, or --device cpu to run the full check on the CPU anyway",
            file=sys.stderr,
        )
        return 2
    report = run(args)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    _print(report)
    print(f"wrote {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
