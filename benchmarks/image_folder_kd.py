"""KD from three teachers through the exact teacher cache, with live teachers, and no KD, on
an augmented image folder: test top-1 and wall times, same schedule, several seeds.

    OMP_NUM_THREADS=2 python benchmarks/image_folder_kd.py        # about 20 min on 2 idle cores
    python benchmarks/image_folder_kd.py --smoke                  # seconds; checks the script

Data, augmentation, student and teachers are ``image_folder_path.py``'s: a 64 px
Fashion-MNIST PNG folder (``--train-images`` training images; ``--val-images`` images of
Fashion-MNIST's test split in ``val/``, the test set here), timm RandomResizedCrop + flip +
RandAugment ``rand-m9-mstd0.5`` and mixup/CutMix (0.8/1.0), ``mobilenetv3_small_050``, the
zoo's three Fashion-MNIST teachers, Hinton KD at T = 4 (+ cross-entropy on the mixed
targets), AdamW (``--lr``, weight decay 0.05) with a cosine schedule, ``--epochs`` epochs of
batch ``--batch-size``, no validation, the final weights tested.

Per seed (``--seeds``), each a ``DistillationModule`` fit under a Lightning ``Trainer`` after
``seed_everything(seed)``:

- ``no_kd``: the student alone (labels only);
- ``live``: the three teachers run on every training batch;
- ``cached``: first the cache build (``build_teacher_cache``: what ``visdistill cache``
  runs), over the same training loader for the fit's ``--epochs`` epochs, then the fit
  reading the teachers' top-10 (= all) log-probabilities from it. The cache is exact: it
  holds the teachers' outputs on exactly the augmented, mixed images the fit trains on (the
  shuffle, and so the mixed pairs, follow the seed, so each seed gets its own cache).

Reported per seed and variant: test top-1, fit seconds (``Trainer.fit``), test seconds; for
``cached`` the build seconds separately and build + fit against the live fit; cached minus
live top-1 per seed (the cache is exact up to fp16 rounding of the log-probabilities, so
the two should differ by run-to-run noise only); the teachers' own top-1 on the test images.
A Markdown table is printed; the JSON (``benchmarks/results/image_folder_kd.json``) is
written atomically after every fit, with the command, versions, threads and the load
average at start and end. ``--smoke`` runs tiny sizes in a temporary folder and writes there
unless ``--out`` is given: never over measured results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from image_folder_common import (
    AUGMENT,
    MIX,
    SIZE,
    STUDENT,
    TEACHERS,
    TEMPERATURE,
    command,
    data_module,
    default_folder,
    distillation_module,
    machine,
    prepare_folder,
    quiet_lightning,
    trainer,
)

from visdistill.checkpoints import atomic_write
from visdistill.quiet import quiet_dependencies
from visdistill.teacher_cache import build_teacher_cache

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "image_folder_kd.json"
FULL = dict(train_images=5000, val_images=2000, epochs=8, batch_size=64, seeds=[0, 1])
SMOKE = dict(train_images=32, val_images=24, epochs=1, batch_size=8, seeds=[0, 1])
VARIANTS = ("no_kd", "live", "cached")


def _fit(args: argparse.Namespace, folder: Path, seed: int, teachers: bool,
         cache: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One fit from ``seed_everything(seed)``, then the test of its final weights."""
    L.seed_everything(seed, verbose=False)
    module = distillation_module(teachers, str(cache) if cache else None, args.lr, args.epochs)
    dm = data_module(folder, args.batch_size, None, args.workers, test=True)
    run = trainer(args.epochs)
    start = time.perf_counter()
    run.fit(module, dm)
    fit_s = time.perf_counter() - start
    train = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("train/")}
    start = time.perf_counter()
    (result,) = run.test(module, datamodule=dm, verbose=False)
    return {
        "top1": 100.0 * float(result["test/acc"]),
        "fit_s": fit_s,
        "test_s": time.perf_counter() - start,
        "train_steps": int(run.global_step),
        "last_train_metrics": train,
    }


def _build(args: argparse.Namespace, folder: Path, seed: int, out: Path) -> dict[str, Any]:
    """The exact cache for ``seed``'s fit: its training loader, its epochs."""
    L.seed_everything(seed, verbose=False)  # the fit's shuffle, hence its mixed batches
    module = distillation_module(True, None, args.lr, args.epochs)
    dm = data_module(folder, args.batch_size, None, args.workers, test=True)
    start = time.perf_counter()
    build_teacher_cache(module, dm, out, epochs=args.epochs, top_k=10, progress=False)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"build_s": seconds, "cache_bytes": size}


@torch.no_grad()
def teacher_accuracy(folder: Path, batch_size: int) -> dict[str, float]:
    """Each teacher's and the ensemble's (mean probability) top-1 on the test images."""
    module = distillation_module(True)
    module.teachers.eval()
    dm = data_module(folder, batch_size, None, 0, test=True)
    dm.setup("test")
    correct, seen = torch.zeros(len(TEACHERS) + 1), 0
    for batch in dm.test_dataloader():
        outs = module.teachers(batch["image"])
        probs = [o.logits.softmax(-1) for o in outs]
        probs.append(torch.stack(probs).mean(0))
        for i, p in enumerate(probs):
            correct[i] += (p.argmax(-1) == batch["target"]).sum()
        seen += len(batch["target"])
    names = [*TEACHERS, "ensemble (mean probability)"]
    return {n: 100.0 * float(c) / seen for n, c in zip(names, correct, strict=True)}


def summarise(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per variant the mean top-1 and fit seconds over seeds; per seed the cached minus live
    top-1 (and last logged training loss) and (build + cached fit) / live fit; the range of
    the live top-1 over seeds, to compare the cached minus live difference with."""
    out: dict[str, Any] = {"variants": {}, "per_seed": {}}
    for variant in VARIANTS:
        done = [r[variant] for r in runs.values() if variant in r]
        if done:
            out["variants"][variant] = {
                "top1_mean": statistics.mean(d["top1"] for d in done),
                "fit_s_mean": statistics.mean(d["fit_s"] for d in done),
                "seeds": len(done),
            }
    live_top1 = [r["live"]["top1"] for r in runs.values() if "live" in r]
    if len(live_top1) > 1:
        # What a different seed alone changes: the scale for cached minus live.
        out["live_top1_seed_range"] = max(live_top1) - min(live_top1)
    for seed, r in runs.items():
        if "cached" in r and "live" in r:
            c, live = r["cached"], r["live"]
            loss = "train/loss"
            out["per_seed"][seed] = {
                "cached_minus_live_top1": c["top1"] - live["top1"],
                "cached_minus_live_last_train_loss": c["last_train_metrics"][loss]
                - live["last_train_metrics"][loss],
                "build_plus_cached_fit_s": c["build_s"] + c["fit_s"],
                "build_plus_cached_fit_over_live_fit": (c["build_s"] + c["fit_s"]) / live["fit_s"],
                "cached_fit_over_live_fit": c["fit_s"] / live["fit_s"],
            }
    return out


def markdown(report: dict[str, Any]) -> str:
    """The results as two Markdown tables: top-1 per seed, and wall times."""
    runs, seeds = report["runs"], list(report["runs"])
    names = {"no_kd": "no KD (labels only)", "live": "KD, live teachers",
             "cached": "KD, exact teacher cache"}  # fmt: skip
    head = "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    lines = [head, "|---" * (len(seeds) + 2) + "|"]
    for v in VARIANTS:
        cells = [f"{runs[s][v]['top1']:.2f} %" if v in runs[s] else "–" for s in seeds]
        mean = report["summary"]["variants"].get(v, {}).get("top1_mean")
        cells.append(f"{mean:.2f} %" if mean is not None else "–")
        lines.append(f"| {names[v]} | " + " | ".join(cells) + " |")
    diffs = report["summary"]["per_seed"]
    if diffs:
        cells = [f"{diffs[s]['cached_minus_live_top1']:+.2f}" if s in diffs else "–" for s in seeds]
        spread = report["summary"].get("live_top1_seed_range")
        note = f"live seed range {spread:.2f}" if spread is not None else ""
        lines.append("| cached − live (points) | " + " | ".join(cells) + f" | {note} |")
    lines += ["", "| seed | no KD fit | live fit | cache build | cached fit | build + cached fit | "
              "(build + cached) / live |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in seeds:
        r = runs[s]

        def sec(v: str, key: str = "fit_s", r: dict = r) -> str:
            return f"{r[v][key]:.0f} s" if v in r and key in r[v] else "–"

        ratio = diffs.get(s, {}).get("build_plus_cached_fit_over_live_fit")
        total = diffs.get(s, {}).get("build_plus_cached_fit_s")
        lines.append(
            f"| {s} | {sec('no_kd')} | {sec('live')} | {sec('cached', 'build_s')} | "
            f"{sec('cached')} | {f'{total:.0f} s' if total else '–'} | "
            f"{f'{ratio:.2f}' if ratio else '–'} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the script")
    parser.add_argument("--folder", type=Path, default=None,
                        help=f"where the PNG folder is written once and reused (default: "
                             f"{default_folder()}; --smoke: a temporary folder)")  # fmt: skip
    parser.add_argument("--train-images", type=int, default=None, help="training PNGs")
    parser.add_argument("--val-images", type=int, default=None, help="test PNGs (val/)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default: {RESULTS})")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.train_images < 1 or args.val_images < 1:
        parser.error("--epochs, --train-images and --val-images must be >= 1")
    if args.batch_size < 2 or args.batch_size % 2 or args.batch_size > args.train_images:
        parser.error("--batch-size must be even (mixup/CutMix pairs) and <= --train-images")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds lists a seed twice: {args.seeds}")
    if args.smoke:  # a smoke run's numbers say nothing: never over the measured results
        tmp = Path(tempfile.gettempdir()) / "visdistill_image_folder_kd"
        args.folder = args.folder or tmp
        args.out = args.out or tmp / "image_folder_kd.json"
    args.folder = args.folder or default_folder()
    args.out = args.out or RESULTS
    return args


def _run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    t0 = time.perf_counter()

    def save() -> None:
        report["summary"] = summarise(report["runs"])
        report["machine_end"] = machine()
        report["elapsed_s"] = time.perf_counter() - t0
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))

    folder, write_s = prepare_folder(args.folder, args.train_images, args.val_images)
    report["folder"] = {"path": str(folder), "write_s": write_s}
    print(
        f"[{time.perf_counter() - t0:6.0f} s] folder {folder} ({write_s:.1f} s to write)",
        flush=True,
    )
    report["teachers_top1"] = teacher_accuracy(folder, 256)
    accuracies = ", ".join(f"{n} {a:.2f} %" for n, a in report["teachers_top1"].items())
    print(f"[{time.perf_counter() - t0:6.0f} s] teachers' top-1 on the test images: {accuracies}")
    with tempfile.TemporaryDirectory(prefix="image_folder_kd-") as work:
        for i, seed in enumerate(args.seeds):
            runs = report["runs"].setdefault(str(seed), {})
            # Alternate the order between seeds: drift in the machine's load hits all alike.
            for variant in VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS)):
                if variant == "cached":
                    cache = Path(work) / f"cache_seed{seed}"
                    built = _build(args, folder, seed, cache)
                    runs[variant] = {**_fit(args, folder, seed, True, cache), **built}
                else:
                    runs[variant] = _fit(args, folder, seed, variant == "live")
                r = runs[variant]
                extra = f", cache build {r['build_s']:.0f} s" if "build_s" in r else ""
                print(f"[{time.perf_counter() - t0:6.0f} s] seed {seed} {variant:<7} top-1 "
                      f"{r['top1']:6.2f} %  fit {r['fit_s']:.0f} s{extra}", flush=True)  # fmt: skip
                save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    report: dict[str, Any] = {
        "command": command(__file__, argv),
        "smoke": args.smoke,
        "machine_start": machine(),
        "config": {
            "image_size": SIZE, "student": STUDENT, "teachers": TEACHERS,
            "kd_temperature": TEMPERATURE, "augmentation": AUGMENT, "mixing": MIX,
            "train_images": args.train_images, "test_images": args.val_images,
            "epochs": args.epochs, "batch_size": args.batch_size, "seeds": args.seeds,
            "lr": args.lr, "workers": args.workers, "cache_top_k": 10,
        },
        "runs": {},
    }  # fmt: skip
    with quiet_dependencies():
        _run(args, report)
    report["markdown"] = markdown(report)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    print("\n" + report["markdown"])
    print(f"\nwrote {args.out} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
