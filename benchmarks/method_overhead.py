"""Extra trainable parameters and training-step time of every distillation term, against
plain KD, on the quickstart setting (3 zoo teachers -> mobilenetv3_small_050, batch 128).

    python benchmarks/method_overhead.py --rounds 3 --steps 5

Each round times ``--steps`` optimisation steps (forward of student and teachers, losses,
backward, AdamW) of every method in turn, so slow phases of a shared machine hit all
methods alike; the median over rounds is reported, with the ratio to KD.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from visdistill import (
    DKD,
    KD,
    MEALV2,
    ND,
    OFA,
    TRG,
    UNIC,
    DistillationModule,
    FashionMNISTDataModule,
    ModelConfig,
    MSTRouting,
)

TEACHERS = ["zoo:fmnist_resnet10t", "zoo:fmnist_vit_tiny_p8", "zoo:fmnist_convnext_atto"]
METHODS = {
    "student only": lambda: [],
    "kd": lambda: [KD()],
    "dkd": lambda: [DKD(warmup_epochs=0)],
    "ofa": lambda: [OFA(eps=1.2)],
    "nd (+kd)": lambda: [KD(), ND(cache_dir="")],
    "trg (+kd)": lambda: [
        KD(),
        TRG(student_stage=2, teacher_stage=[2, -1, 1], grid=4, context_weight=10.0),
    ],
    "meal_v2": lambda: [MEALV2()],
    "unic (+kd)": lambda: [UNIC(), KD()],
    "mst": lambda: [MSTRouting(mode="utility", router_input="teacher_stats")],
    "mst (+gates)": lambda: [
        MSTRouting(mode="utility", router_input="teacher_stats", feature_gates=True)
    ],
}


def build(name: str) -> tuple[DistillationModule, int]:
    torch.manual_seed(0)
    terms = METHODS[name]()
    module = DistillationModule(
        student=ModelConfig("mobilenetv3_small_050", num_classes=10),
        teachers=[ModelConfig(t) for t in TEACHERS] if terms else None,
        terms=terms,
    )
    for term in module.terms:
        if isinstance(term, ND):  # real means are not needed for timing
            term.set_class_means([torch.randn(10, t.num_features) for t in module.teachers])
    extra = sum(p.numel() for t in module.terms for p in t.parameters() if p.requires_grad)
    return module, extra


def time_steps(module: DistillationModule, batches: list[dict], steps: int) -> float:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()

    def step(batch):
        loss, _, _ = module.compute_losses(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/method_overhead.json")
    args = parser.parse_args()
    dm = FashionMNISTDataModule(batch_size=args.batch_size, train_subset=args.batch_size * 4)
    dm.setup("fit")
    batches = [b for _, b in zip(range(4), dm.train_dataloader(), strict=False)]
    modules = {name: build(name) for name in METHODS}
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, (module, _) in modules.items():
            times[name].append(time_steps(module, batches, args.steps))
    kd = statistics.median(times["kd"])
    rows = {}
    print(f"{'method':<14} {'extra params':>12} {'step s':>8} {'vs KD':>6}")
    for name, (_, extra) in modules.items():
        t = statistics.median(times[name])
        rows[name] = {"extra_params": extra, "step_s": t, "vs_kd": t / kd}
        print(f"{name:<14} {extra:>12,} {t:>8.3f} {t / kd:>5.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "methods": rows}, indent=1))


if __name__ == "__main__":
    main()
