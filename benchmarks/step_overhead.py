"""Where a visdistill training step's time goes: the models' work against the bookkeeping
around it (Lightning's loop and ``self.log``, the train metric, the non-finite check).

    python benchmarks/step_overhead.py                     # 3 zoo teachers, CPU time, 1 thread
    python benchmarks/step_overhead.py --teachers 1 --clock wall --threads 2

Same setup as ``benchmarks/throughput.py`` (mobilenetv3_small_050 student, the zoo's
Fashion-MNIST teachers, KD, batch 128, AdamW). The module's methods are wrapped with timers
for ``--steps`` steps after ``--warmup``; the remainder of the step (everything the timers do
not cover) is the Lightning loop itself. CPU time (``--clock cpu``, the default) is steadier
than wall time when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time

import lightning as L
import torch
from throughput import STUDENT, TEACHERS, _data

from visdistill import KD, DistillationModule, ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    spent: dict[str, float] = collections.defaultdict(float)
    timing = [False]

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = clock()
            out = fn(*a, **k)
            if timing[0]:
                spent[name] += clock() - start
            return out

        return wrapper

    class Span(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                timing[0], spent["_start"] = True, clock()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                timing[0], spent["_end"] = False, clock()

    torch.manual_seed(0)
    module = DistillationModule(
        student=ModelConfig(STUDENT, num_classes=10),
        teachers=[ModelConfig(t) for t in TEACHERS[: args.teachers]],
        terms=[KD(temperature=4.0)],
        eval_teachers=False,
    )
    hooks = ("compute_losses", "backward", "training_step", "log", "log_dict")
    hooks += ("_update_term_progress",)
    for name in hooks:
        setattr(module, name, timed(name, getattr(module, name)))
    guard = module.nonfinite_guard
    guard.loss_is_nonfinite = timed("_loss_is_nonfinite", guard.loss_is_nonfinite)
    module.train_acc.update = timed("train_acc.update", module.train_acc.update)
    configure = module.configure_optimizers

    def configure_optimizers():
        opt = configure()
        opt.step = timed("optimizer.step", opt.step)
        opt.zero_grad = timed("zero_grad", opt.zero_grad)
        return opt

    module.configure_optimizers = configure_optimizers
    data = _data(
        argparse.Namespace(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps)
    )
    # Loading a batch (crop/flip replay, collation) costs every loop alike: measured on its own.
    start = clock()
    loaded = sum(1 for _ in data.train_dataloader())
    loading = (clock() - start) / loaded
    L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[Span()], default_root_dir=tempfile.mkdtemp(),
    ).fit(module, data)  # fmt: skip

    n, s = args.steps, spent
    total = (s["_end"] - s["_start"]) / n
    rows = {
        "compute_losses (student + teachers + KD)": s["compute_losses"],
        "backward": s["backward"],
        # optimizer.step runs Lightning's closure: training_step, zero_grad, backward.
        "AdamW step": s["optimizer.step"] - s["training_step"] - s["zero_grad"] - s["backward"],
        "zero_grad": s["zero_grad"],
        "self.log / self.log_dict": s["log"],
        "train_acc.update": s["train_acc.update"],
        "non-finite check": s["_loss_is_nonfinite"],
        "term progress": s["_update_term_progress"],
    }
    inside = s["training_step"] - s["compute_losses"] - s["log"]
    rows["rest of training_step"] = inside - s["train_acc.update"] - s["_loss_is_nonfinite"]
    rows["rest of training_step"] -= s["_update_term_progress"]
    rows["data loading (measured alone)"] = loading * n
    rows["Lightning loop outside the optimizer step"] = (
        s["_end"] - s["_start"] - s["optimizer.step"] - loading * n
    )
    print(f"{args.teachers} teacher(s), batch {args.batch_size}, {args.clock} time, {n} steps")
    print(f"{'part':<45} {'ms/step':>9} {'share':>7}")
    for name, value in rows.items():
        print(f"{name:<45} {1e3 * value / n:9.2f} {100 * value / n / total:6.2f}%")
    work = ("compute_losses", "backward", "AdamW", "zero_grad", "data loading")
    book = sum(v for k, v in rows.items() if not k.startswith(work)) / n
    label = "bookkeeping (all but models, optimizer, data)"
    print(f"{label:<45} {1e3 * book:9.2f} {100 * book / total:6.2f}%")
    print(f"{'whole step':<45} {1e3 * total:9.2f}")


if __name__ == "__main__":
    main()
