"""Training throughput: visdistill against a hand-written KD loop, student-only training,
the teacher cache and timm's built-in distillation task, in one process on one batch size.

    python benchmarks/throughput.py                 # 3 teachers + 1-teacher comparison
    python benchmarks/throughput.py --steps 30 --batch-size 128

Every variant trains the quickstart's student (mobilenetv3_small_050) on the same
Fashion-MNIST batches (AdamW). Timing covers optimisation steps after ``--warmup`` steps:
data loading, forward, backward and the optimizer, measured the same way for all (wall
clock between the first timed step's start and the last one's end). Run it on a quiet
machine; numbers are images/s and ratios against the baselines of the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from visdistill import KD, DistillationModule, FashionMNISTDataModule, ModelConfig
from visdistill.models import Backbone
from visdistill.teacher_cache import build_teacher_cache
from visdistill.teachers import Teacher

STUDENT = "mobilenetv3_small_050"
TEACHERS = ["zoo:fmnist_resnet10t", "zoo:fmnist_vit_tiny_p8", "zoo:fmnist_convnext_atto"]


class _Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch["target"])
            self.end = time.perf_counter()


def _data(args) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        batch_size=args.batch_size, train_subset=args.batch_size * (args.warmup + args.steps),
        val_split=1000,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def visdistill_run(args, teachers, cache: str | None = None) -> float:
    """Images/s of ``DistillationModule`` under a Lightning Trainer."""
    torch.manual_seed(0)
    module = DistillationModule(
        student=ModelConfig(STUDENT, num_classes=10),
        teachers=[ModelConfig(t) for t in teachers],
        terms=[KD(temperature=4.0)] if teachers else [],
        eval_teachers=False,
        teacher_cache=cache,
    )
    timer = _Timer(args.warmup)
    L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[timer], default_root_dir=tempfile.mkdtemp(),
    ).fit(module, _data(args))  # fmt: skip
    return timer.images / (timer.end - timer.start)


def hand_written_run(args, teachers) -> float:
    """The loop a user would write: frozen teachers in eval/no_grad, each normalising the
    batch for itself, Hinton KD + CE, AdamW."""
    torch.manual_seed(0)
    student = Backbone(STUDENT, num_classes=10).model.train()
    nets = [Teacher(t) for t in teachers]
    stats = [(n.model, n.input_spec.mean, n.input_spec.std) for n in nets]
    norm = [
        (m, torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(sd).view(1, -1, 1, 1))
        for m, mu, sd in stats
    ]
    s_mean = torch.tensor((0.485, 0.456, 0.406)).view(1, -1, 1, 1)
    s_std = torch.tensor((0.229, 0.224, 0.225)).view(1, -1, 1, 1)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    t, images, start = 4.0, 0, None
    for i, batch in enumerate(_data(args).train_dataloader()):
        if i == args.warmup:
            start = time.perf_counter()
        x, y = batch["image"], batch["target"]
        with torch.no_grad():
            probs = torch.stack([(m((x - mu) / sd) / t).softmax(-1) for m, mu, sd in norm], 0).mean(
                0
            )
        logits = student((x - s_mean) / s_std)
        kd = F.kl_div(F.log_softmax(logits / t, -1), probs, reduction="batchmean") * t * t
        loss = F.cross_entropy(logits, y) + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            images += len(y)
    return images / (time.perf_counter() - start)


def timm_task_run(args, teacher: str) -> float:
    """timm's LogitDistillationTask (one teacher) in the same loop."""
    from timm.task import LogitDistillationTask

    torch.manual_seed(0)
    student = Backbone(STUDENT, num_classes=10).model
    teacher_model = Teacher(teacher).model
    task = LogitDistillationTask(
        student, teacher_model, temperature=4.0, distill_loss_weight=1.0, task_loss_weight=1.0,
        verbose=False,
    )  # fmt: skip
    task.train()
    task.teacher.eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, -1, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, -1, 1, 1)
    images, start = 0, None
    for i, batch in enumerate(_data(args).train_dataloader()):
        if i == args.warmup:
            start = time.perf_counter()
        out = task((batch["image"] - mean) / std, batch["target"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if i >= args.warmup:
            images += len(batch["target"])
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results: dict[str, float] = {}

    def record(name: str, value: float) -> None:
        results[name] = value
        print(f"{name:<40} {value:8.1f} img/s", flush=True)

    record("student only (visdistill)", visdistill_run(args, []))
    record("hand-written KD loop, 3 teachers", hand_written_run(args, TEACHERS))
    record("visdistill live, 3 teachers", visdistill_run(args, TEACHERS))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        builder = DistillationModule(
            student=ModelConfig(STUDENT, num_classes=10),
            teachers=[ModelConfig(t) for t in TEACHERS],
            terms=[KD()],
        )
        start = time.perf_counter()
        build_teacher_cache(builder, _data(args), Path(tmp) / "c", epochs=1, progress=False)
        results["cache build s/epoch"] = time.perf_counter() - start
        record(
            "visdistill cached, 3 teachers", visdistill_run(args, TEACHERS, str(Path(tmp) / "c"))
        )
    record("hand-written KD loop, 1 teacher", hand_written_run(args, TEACHERS[:1]))
    record("visdistill live, 1 teacher", visdistill_run(args, TEACHERS[:1]))
    record("timm LogitDistillationTask, 1 teacher", timm_task_run(args, TEACHERS[0]))

    r = results
    ratios = {
        "visdistill live / hand loop step time (3 teachers)": r["hand-written KD loop, 3 teachers"]
        / r["visdistill live, 3 teachers"],
        "visdistill live / hand loop step time (1 teacher)": r["hand-written KD loop, 1 teacher"]
        / r["visdistill live, 1 teacher"],
        "visdistill live / timm task step time (1 teacher)": r[
            "timm LogitDistillationTask, 1 teacher"
        ]
        / r["visdistill live, 1 teacher"],
        "cached epoch / student-only epoch": r["student only (visdistill)"]
        / r["visdistill cached, 3 teachers"],
        "live epoch / cached epoch (speed-up)": r["visdistill cached, 3 teachers"]
        / r["visdistill live, 3 teachers"],
    }
    print()
    for name, value in ratios.items():
        print(f"{name:<55} {value:6.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "images_per_s": results, "ratios": ratios}, indent=1)
    )


if __name__ == "__main__":
    main()
