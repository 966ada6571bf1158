"""Does the DisWOT score rank students the way short KD training does? (Fashion-MNIST)

    nice -n 5 python benchmarks/diswot_study.py            # ~15-20 min on 2 CPU cores
    python benchmarks/diswot_study.py --quick              # smoke run, 3 candidates

For each candidate student (timm names and points of the ResNet / MobileNetV3 families):

1. score it against the zoo teacher ``zoo:fmnist_resnet10t`` with DisWOT (one batch of 64
   training images; default: random-init teacher, gaussian init), plus variants (trained
   teacher, timm init, each component alone, mean of 3 seeds) and the parameter count as
   a naive baseline;
2. train it with Hinton KD (T = 4) from the same teacher on a short schedule
   (``--train-subset`` images, ``--epochs``, batch 64, no augmentation), AdamW + cosine,
   and measure top-1 on
   ``--test-subset`` test images (the last weights; no validation).

Reports Kendall tau and Spearman rho between every score and the distilled accuracy, and the
time to score all candidates against the time to train them (the speed-up ratio). Writes
``benchmarks/results/diswot_study.json`` and a scatter plot.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from scipy import stats

from visdistill import KD, DistillationModule, FashionMNISTDataModule, ModelConfig
from visdistill.search import Candidate, DisWOTScorer, MobileNetV3Space, ResNetSpace, measure_cost
from visdistill.search.run import build_teacher, score_batch

TEACHER = "zoo:fmnist_resnet10t"
_RES = ResNetSpace(depths=(1, 2), widths=(0.25, 0.5))
_MNV3 = MobileNetV3Space()
CANDIDATES = [
    Candidate.of("mobilenetv3_small_050"),
    Candidate.of("mobilenetv3_small_075"),
    Candidate.of("mobilenetv3_small_100"),
    _MNV3.decode(("mobilenetv3_small_100", 0.5)),
    _MNV3.decode(("mobilenetv3_large_075", 0.5)),
    Candidate.of("lcnet_050"),
    Candidate.of("lcnet_100"),
    Candidate.of("regnetx_002"),
    Candidate.of("mnasnet_small"),
    _RES.decode((1, 1, 1, 1, 0.25)),
    _RES.decode((1, 1, 1, 1, 0.5)),
    _RES.decode((2, 2, 2, 2, 0.25)),
]
VARIANTS = {
    "diswot (default: random teacher, gaussian init)": dict(),
    "diswot, trained teacher": dict(reinit_teacher=False),
    "diswot, timm init": dict(init="default"),
    "semantic only": dict(use=("semantic",)),
    "relation only": dict(use=("relation",)),
}


def score_all(candidates, teacher, images, targets, seed=0, **kwargs):
    scorer = DisWOTScorer(teacher, images, targets, seed=seed, **kwargs)
    out = []
    for c in candidates:
        torch.manual_seed(seed)
        out.append(scorer(c.build(10), copy_model=False).total)
    return out


def train_one(c: Candidate, args, seed: int) -> tuple[float, float]:
    """KD from the teacher on a short schedule; returns (test top-1 %, seconds)."""
    L.seed_everything(seed, verbose=False)
    module = DistillationModule(
        student=ModelConfig(c.arch, num_classes=10, model_kwargs=c.model_kwargs),
        teachers=[ModelConfig(TEACHER)],
        terms=[KD(temperature=4.0)],
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.epochs),
        eval_teachers=False,
    )
    dm = FashionMNISTDataModule(
        batch_size=args.train_batch,
        val_split=6000,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        augment=args.augment,
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    acc = trainer.test(module, dm, verbose=False)[0]["test/acc"]
    return 100.0 * float(acc), seconds


def correlations(x, y) -> dict[str, float]:
    tau = stats.kendalltau(x, y)
    rho = stats.spearmanr(x, y)
    return {
        "kendall_tau": float(tau.statistic),
        "kendall_p": float(tau.pvalue),
        "spearman_rho": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
    }


def short_label(row) -> str:
    kw = row["model_kwargs"]
    name = row["arch"].replace("mobilenetv3_", "mnv3_").replace("resnet10t", "r10t")
    if "layers" in kw:
        name += f" d{''.join(map(str, kw['layers']))} w{kw['channels'][0]}"
    if "depth_multiplier" in kw:
        name += f" dm{kw['depth_multiplier']}"
    return name


def plot(rows, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    xs = [r["scores"][next(iter(VARIANTS))] for r in rows]
    ys = [r["acc_mean"] for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(short_label(r), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.margins(x=0.25, y=0.08)
    ax.set_xlabel("DisWOT score (random teacher, gaussian init; higher = better)")
    ax.set_ylabel("KD test top-1 (%)")
    ax.set_title("DisWOT score vs short-schedule KD accuracy, Fashion-MNIST", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--augment", action="store_true", help="crop + flip (off: faster start)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--batch-size", type=int, default=64, help="the score batch")
    parser.add_argument("--quick", action="store_true", help="3 candidates, tiny schedule")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared, oversubscribed machine 2 threads ran a "
        "mobilenetv3 step 12x slower than 1)",
    )
    parser.add_argument("--out", default="benchmarks/results/diswot_study.json")
    parser.add_argument("--plot", default="docs/images/diswot_study.png")
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.out).read_text())["rows"], Path(args.plot))
        return
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    candidates = CANDIDATES[:3] if args.quick else CANDIDATES
    if args.quick:
        args.train_subset, args.test_subset, args.epochs = 512, 512, 1

    images, targets, num_classes = score_batch("fashion-mnist", args.batch_size, seed=0)
    torch.manual_seed(0)
    teacher, _, _ = build_teacher(TEACHER, num_classes)

    # 1. Scores. The default variant is timed alone: what `visdistill search` pays.
    start = time.perf_counter()
    default_scores = score_all(candidates, teacher, images, targets)
    score_seconds = time.perf_counter() - start
    scores = {next(iter(VARIANTS)): default_scores}
    for name, kwargs in list(VARIANTS.items())[1:]:
        scores[name] = score_all(candidates, teacher, images, targets, **kwargs)
    per_seed = [score_all(candidates, teacher, images, targets, seed=s) for s in (0, 1, 2)]
    scores["diswot, mean of seeds 0-2"] = [sum(v) / 3 for v in zip(*per_seed, strict=True)]
    costs = [measure_cost(c, num_classes, 32, flops=True) for c in candidates]
    scores["params (baseline: bigger = better)"] = [float(c.params) for c in costs]
    scores["-params (baseline: smaller = better)"] = [-float(c.params) for c in costs]
    print(f"scored {len(candidates)} candidates in {score_seconds:.1f} s")

    # 2. Short KD training of every candidate.
    rows = []
    train_seconds = 0.0
    for i, c in enumerate(candidates):
        accs, secs = [], []
        for seed in args.seeds:
            acc, sec = train_one(c, args, seed)
            accs.append(acc)
            secs.append(sec)
        train_seconds += sum(secs)
        row = {
            "label": c.label,
            "arch": c.arch,
            "model_kwargs": c.model_kwargs,
            "params": costs[i].params,
            "flops": costs[i].flops,
            "acc": accs,
            "acc_mean": sum(accs) / len(accs),
            "train_seconds": secs,
            "scores": {name: values[i] for name, values in scores.items()},
        }
        rows.append(row)
        print(f"{c.label}: top-1 {row['acc_mean']:.2f} % ({sum(secs):.0f} s), "
              f"score {default_scores[i]:.4g}")  # fmt: skip

    accs = [r["acc_mean"] for r in rows]
    result = {
        "teacher": TEACHER,
        "data": "fashion-mnist",
        "score_batch": args.batch_size,
        "schedule": {
            "train_subset": args.train_subset,
            "epochs": args.epochs,
            "test_subset": args.test_subset,
            "seeds": args.seeds,
            "train_batch": args.train_batch,
            "augment": args.augment,
            "recipe": "KD T=4 + CE, AdamW lr 3e-3 wd 0.05, cosine, last weights",
        },
        "machine": f"2 shared CPU cores, torch threads {args.threads}",
        "score_seconds": score_seconds,
        "train_seconds": train_seconds,
        "speedup": train_seconds / score_seconds,
        "correlations": {name: correlations(values, accs) for name, values in scores.items()},
        "rows": sorted(rows, key=lambda r: -r["acc_mean"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(rows, Path(args.plot))
    print(f"\nscore all: {score_seconds:.1f} s; train all: {train_seconds:.0f} s; "
          f"speed-up {result['speedup']:.0f}x")  # fmt: skip
    for name, corr in result["correlations"].items():
        print(f"{name:45s} tau {corr['kendall_tau']:+.3f}  rho {corr['spearman_rho']:+.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
