"""Student top-1 on Fashion-MNIST for every distillation method, on one short schedule.

Each run is `visdistill fit --config configs/<method>.yaml` with overrides (fewer epochs
and training images than the configs, so the whole table fits in under an hour on 2 CPU
cores), in its own process; test accuracy is read from the run's CSV log. Settings:

- ``ens``: the three heterogeneous teachers (resnet10t, ViT, convnext_atto) ->
  mobilenetv3_small_050 (as the configs);
- ``vit2cnn``: the ViT teacher alone -> mobilenetv3_small_050;
- ``cnn2vit``: the resnet10t teacher alone -> a 4-block ViT student (patch 4).

    python benchmarks/compare_methods.py --epochs 4 --train-subset 10000 --seeds 0
    python benchmarks/compare_methods.py --only ens:kd ens:ofa      # a subset

Prints a Markdown table (accuracy, wall time, time ratio against plain KD of the same
setting) and writes ``benchmarks/results/compare_methods.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESNET = "{name: zoo:fmnist_resnet10t}"
VIT = "{name: zoo:fmnist_vit_tiny_p8}"
VIT_STUDENT = (
    "{name: vit_tiny_patch16_224, num_classes: 10, "
    "model_kwargs: {img_size: 32, patch_size: 4, depth: 4}}"
)
METHOD_CONFIG = {
    "baseline": "student_baseline",
    "kd": "quickstart",
    "dkd": "dkd",
    "ofa": "ofa",
    "nd": "nd",
    "trg": "trg",
    "meal_v2": "meal_v2",
    "unic": "unic",
    "mst": "mst",
}
KD = "{class_path: visdistill.KD, init_args: {temperature: 4.0}}"


def _single_teacher_trg(stage: int, student_stage: int) -> str:
    return (
        f"[{KD}, {{class_path: visdistill.TRG, init_args: {{student_stage: {student_stage}, "
        f"teacher_stage: {stage}, grid: 4, tokens_per_image: 8, k: 8, context_weight: 10.0}}}}]"
    )


SETTINGS = {
    "ens": {"methods": list(METHOD_CONFIG), "overrides": {}},
    "vit2cnn": {
        "methods": ["kd", "dkd", "ofa", "nd", "trg"],
        "overrides": {"--model.teachers": f"[{VIT}]"},
        "trg_terms": _single_teacher_trg(-1, 2),
    },
    "cnn2vit": {
        "methods": ["baseline", "kd", "dkd", "ofa", "nd", "trg"],
        "overrides": {"--model.teachers": f"[{RESNET}]", "--model.student": VIT_STUDENT},
        "trg_terms": _single_teacher_trg(2, -1),
    },
}


def run(setting: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{setting}_{method}_s{seed}"
    overrides = dict(SETTINGS[setting]["overrides"])
    if method == "baseline":
        overrides.pop("--model.teachers", None)
    else:  # teachers' accuracies are known; don't spend the run's time on them
        overrides["--model.eval_teachers"] = "false"
    if method == "trg" and "trg_terms" in SETTINGS[setting]:
        overrides["--model.terms"] = SETTINGS[setting]["trg_terms"]
    cmd = [
        sys.executable, "-m", "visdistill.cli", "fit",
        "--config", f"configs/{METHOD_CONFIG[method]}.yaml",
        "--seed_everything", str(seed),
        "--trainer.max_epochs", str(args.epochs),
        "--model.scheduler.init_args.T_max", str(args.epochs),
        "--data.init_args.train_subset", str(args.train_subset),
        "--data.init_args.val_split", "2000",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(args.out),
        "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", "",
    ]  # fmt: skip
    for key, value in overrides.items():
        cmd += [key, value]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"setting": setting, "method": method, "seed": seed, "error": proc.returncode}
    metrics = _read_metrics(Path(args.out) / name / "metrics.csv")
    return {
        "setting": setting,
        "method": method,
        "seed": seed,
        "test_acc": metrics.get("test/acc"),
        "val_acc": metrics.get("val/acc"),
        "seconds": round(elapsed, 1),
    }


def _read_metrics(path: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    last[key] = float(value)
    return last


def table(results: list[dict]) -> str:
    lines = [
        "| setting | method | test top-1 (%) | seeds | wall s | time vs KD |",
        "|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        rows = [r for r in results if r["setting"] == setting and "test_acc" in r]
        kd_time = _mean([r["seconds"] for r in rows if r["method"] == "kd"])
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            accs = [100 * r["test_acc"] for r in mine]
            secs = _mean([r["seconds"] for r in mine])
            acc = f"{_mean(accs):.2f}" + (
                f" ± {(max(accs) - min(accs)) / 2:.2f}" if len(accs) > 1 else ""
            )
            ratio = f"{secs / kd_time:.2f}x" if kd_time else "-"
            lines.append(f"| {setting} | {method} | {acc} | {len(accs)} | {secs:.0f} | {ratio} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="setting:method pairs to run")
    parser.add_argument("--out", default="runs/compare_methods")
    parser.add_argument("--results", default="benchmarks/results/compare_methods.json")
    args = parser.parse_args()
    results_path = ROOT / args.results
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    todo = [(s, m) for s, cfg in SETTINGS.items() for m in cfg["methods"]]
    if args.only:
        todo = [tuple(x.split(":")) for x in args.only]
    for seed in args.seeds:
        for setting, method in todo:
            if not (ROOT / "configs" / f"{METHOD_CONFIG[method]}.yaml").is_file():
                print(f"skip {setting}:{method}: configs/{METHOD_CONFIG[method]}.yaml missing")
                continue
            r = run(setting, method, seed, args)
            print(json.dumps(r), flush=True)
            results = [
                x
                for x in results
                if (x["setting"], x["method"], x["seed"]) != (setting, method, seed)
            ] + [r]
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
