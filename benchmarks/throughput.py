"""Training throughput: visdistill against a hand-written KD loop, student-only training,
the teacher cache, timm's built-in distillation task and torchdistill (when installed), in
one process on one batch size.

    python benchmarks/throughput.py                          # 5 rounds, 3 teachers + 1-teacher
    python benchmarks/throughput.py --rounds 7 --steps 10 --threads 1

Every variant trains the quickstart's student (mobilenetv3_small_050) on the same
Fashion-MNIST batches (AdamW). Timing covers optimisation steps after ``--warmup`` steps:
data loading, forward, backward and the optimizer, measured the same way for all (from the
start of the first timed step to the end of the last one), as wall-clock images/s and as
process CPU time per step.

The machine is shared, so one run of a variant says little: the variants run in
``--rounds`` interleaved rounds (the order reversed every other round, so slow drift in the
machine's load hits all variants alike). Reported per variant: the median over rounds and
its range. Ratios are given two ways: the ratio of the medians, and the median (and range)
of the per-round ratios, whose two variants ran minutes apart at most.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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


class _Clock:
    """Wall clock and process CPU time over the timed steps (those from ``warmup`` on)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.steps = warmup, 0, 0
        self.start = self.end = (0.0, 0.0)

    def step_start(self, i: int) -> None:
        if i == self.warmup:
            self.start = (time.perf_counter(), time.process_time())

    def step_end(self, i: int, images: int) -> None:
        if i >= self.warmup:
            self.images, self.steps = self.images + images, self.steps + 1
            self.end = (time.perf_counter(), time.process_time())

    def result(self) -> dict[str, float]:
        wall, cpu = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return {"images_per_s": self.images / wall, "cpu_ms_per_step": 1e3 * cpu / self.steps}


class _Timer(L.Callback):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.clock.step_start(batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.clock.step_end(batch_idx, len(batch["target"]))


# The student's input statistics (ImageNet's, timm's default), shared by the hand-written
# loops; the zoo teachers in these runs use the same ones.
_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, -1, 1, 1)
_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, -1, 1, 1)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - _MEAN) / _STD


def _data(args) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        batch_size=args.batch_size, train_subset=args.batch_size * (args.warmup + args.steps),
        val_split=1000,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def visdistill_run(args, teachers, cache: str | None = None) -> dict[str, float]:
    """``DistillationModule`` under a Lightning Trainer."""
    torch.manual_seed(0)
    module = DistillationModule(
        student=ModelConfig(STUDENT, num_classes=10),
        teachers=[ModelConfig(t) for t in teachers],
        terms=[KD(temperature=4.0)] if teachers else [],
        eval_teachers=False,
        teacher_cache=cache,
    )
    clock = _Clock(args.warmup)
    L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[_Timer(clock)], default_root_dir=tempfile.mkdtemp(),
    ).fit(module, _data(args))  # fmt: skip
    return clock.result()


def hand_written_run(args, teachers) -> dict[str, float]:
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
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    t, clock = 4.0, _Clock(args.warmup)
    for i, batch in enumerate(_data(args).train_dataloader()):
        clock.step_start(i)
        x, y = batch["image"], batch["target"]
        with torch.no_grad():
            probs = torch.stack([(m((x - mu) / sd) / t).softmax(-1) for m, mu, sd in norm], 0).mean(
                0
            )
        logits = student(_normalize(x))
        kd = F.kl_div(F.log_softmax(logits / t, -1), probs, reduction="batchmean") * t * t
        loss = F.cross_entropy(logits, y) + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.step_end(i, len(y))
    return clock.result()


def timm_task_run(args, teacher: str) -> dict[str, float]:
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
    clock = _Clock(args.warmup)
    for i, batch in enumerate(_data(args).train_dataloader()):
        clock.step_start(i)
        out = task(_normalize(batch["image"]), batch["target"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        clock.step_end(i, len(batch["target"]))
    return clock.result()


def torchdistill_run(args, teacher: str) -> dict[str, float]:
    """torchdistill's ``DistillationBox`` (one teacher; its KD loss with alpha 0.5, which
    costs the same as CE + KD) driving the step: ``forward_process`` (teacher under
    no_grad, student, loss) and ``post_forward_process`` (backward, AdamW step), the two
    calls its own training loop makes per batch. Our loader feeds it, as in the other
    variants. Teacher and student share the ImageNet input statistics, so the batch is
    normalised once."""
    from torchdistill.core.distillation import get_distillation_box

    torch.manual_seed(0)
    student = Backbone(STUDENT, num_classes=10).model
    teacher_model = Teacher(teacher).model
    kd = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".", "student_module_io": "output",
            "teacher_module_path": ".", "teacher_module_io": "output",
            "temperature": 4.0, "alpha": 0.5,
        },
    }  # fmt: skip
    train_config = {
        "num_epochs": 1,
        "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"forward_proc": "forward_batch_only"},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}},
        },
        "optimizer": {"key": "AdamW", "kwargs": {"lr": 1e-3}},
    }
    box = get_distillation_box(
        teacher_model, student, {}, train_config, torch.device("cpu"), None, False, 1
    )
    box.pre_epoch_process(epoch=0)
    box.teacher_model.eval()
    clock = _Clock(args.warmup)
    for i, batch in enumerate(_data(args).train_dataloader()):
        clock.step_start(i)
        x, y = _normalize(batch["image"]), batch["target"]
        box.pre_forward_process()
        loss = box.forward_process(x, y, {})
        box.post_forward_process(loss)
        clock.step_end(i, len(y))
    return clock.result()


def _torchdistill_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchdistill") is not None


STUDENT_ONLY = "student only (visdistill)"
HAND_3, LIVE_3, CACHED_3 = (
    "hand-written KD loop, 3 teachers",
    "visdistill live, 3 teachers",
    "visdistill cached, 3 teachers",
)
HAND_1, LIVE_1, TIMM_1, TORCHDISTILL_1 = (
    "hand-written KD loop, 1 teacher",
    "visdistill live, 1 teacher",
    "timm LogitDistillationTask, 1 teacher",
    "torchdistill DistillationBox, 1 teacher",
)
# name: (numerator, denominator) of an images/s ratio; > 1 means the denominator is slower.
RATIOS = {
    "visdistill live / hand loop step time (3 teachers)": (HAND_3, LIVE_3),
    "visdistill live / hand loop step time (1 teacher)": (HAND_1, LIVE_1),
    "visdistill live / timm task step time (1 teacher)": (TIMM_1, LIVE_1),
    "visdistill live / torchdistill step time (1 teacher)": (TORCHDISTILL_1, LIVE_1),
    "cached epoch / student-only epoch": (STUDENT_ONLY, CACHED_3),
    "live epoch / cached epoch (speed-up)": (CACHED_3, LIVE_3),
}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rounds: list[dict[str, dict[str, float]]]) -> dict:
    """Medians and ranges per variant, and the ratios (of medians; per round) from the
    rounds' ``{variant: {"images_per_s", "cpu_ms_per_step"}}``."""
    names = list(rounds[0])
    per_variant = {
        n: {k: _spread([r[n][k] for r in rounds]) for k in ("images_per_s", "cpu_ms_per_step")}
        for n in names
    }
    ratios = {}
    for label, (num, den) in RATIOS.items():
        if num not in per_variant or den not in per_variant:
            continue
        paired = [r[num]["images_per_s"] / r[den]["images_per_s"] for r in rounds]
        cpu_paired = [r[den]["cpu_ms_per_step"] / r[num]["cpu_ms_per_step"] for r in rounds]
        ratios[label] = {
            "of_medians": per_variant[num]["images_per_s"]["median"]
            / per_variant[den]["images_per_s"]["median"],
            "per_round": _spread(paired),
            "cpu_time_per_round": _spread(cpu_paired),
        }
    return {"variants": per_variant, "ratios": ratios}


def _write(args, build_s: float, rounds: list[dict[str, dict[str, float]]]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
                "cache_build_s_per_epoch": build_s,
                "rounds": rounds,
                **summarise(rounds),
            },
            indent=1,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "c")
        torch.manual_seed(0)
        builder = DistillationModule(
            student=ModelConfig(STUDENT, num_classes=10),
            teachers=[ModelConfig(t) for t in TEACHERS],
            terms=[KD()],
        )
        start = time.perf_counter()
        build_teacher_cache(builder, _data(args), cache, epochs=1, progress=False)
        build_s = time.perf_counter() - start
        print(f"cache build, {len(TEACHERS)} teachers, one epoch: {build_s:.1f} s", flush=True)
        variants = {
            STUDENT_ONLY: lambda: visdistill_run(args, []),
            HAND_3: lambda: hand_written_run(args, TEACHERS),
            LIVE_3: lambda: visdistill_run(args, TEACHERS),
            CACHED_3: lambda: visdistill_run(args, TEACHERS, cache),
            HAND_1: lambda: hand_written_run(args, TEACHERS[:1]),
            LIVE_1: lambda: visdistill_run(args, TEACHERS[:1]),
            TIMM_1: lambda: timm_task_run(args, TEACHERS[0]),
        }
        if _torchdistill_installed():  # optional: pip install torchdistill
            variants[TORCHDISTILL_1] = lambda: torchdistill_run(args, TEACHERS[0])
        else:
            print("torchdistill is not installed: its variant is skipped", flush=True)
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            rounds.append({})
            for name in order:
                gc.collect()  # the previous variant's garbage is not collected on this one's clock
                rounds[-1][name] = variants[name]()
                res = rounds[-1][name]
                print(
                    f"round {r + 1}/{args.rounds}  {name:<40} {res['images_per_s']:7.1f} img/s"
                    f"  {res['cpu_ms_per_step']:7.1f} CPU ms/step",
                    flush=True,
                )
            rounds[-1] = {n: rounds[-1][n] for n in variants}  # listing order for the summary
            _write(args, build_s, rounds)  # after every round: an interrupted run keeps its data

    summary = summarise(rounds)
    print(f"\n{'variant':<40} {'img/s median':>12}  range")
    for name, v in summary["variants"].items():
        ips = v["images_per_s"]
        print(f"{name:<40} {ips['median']:12.1f}  {ips['min']:.1f}-{ips['max']:.1f}")
    print(f"\n{'ratio':<52} {'of medians':>10}  per round: median (range); CPU time")
    for label, v in summary["ratios"].items():
        pr, cp = v["per_round"], v["cpu_time_per_round"]
        print(
            f"{label:<52} {v['of_medians']:9.3f}x  {pr['median']:.3f}x ({pr['min']:.3f}-"
            f"{pr['max']:.3f}); {cp['median']:.3f}x ({cp['min']:.3f}-{cp['max']:.3f})"
        )


if __name__ == "__main__":
    main()
