"""visdistill's minibatch CKA vs the `torch-cka` package (PyPI 0.21) on the same models,
data, layers and batches. Each configuration runs in a fresh subprocess, so its peak
resident memory is its own.

    pip install --no-deps torch-cka
    python benchmarks/cka_speed.py [--sizes 512 2048 4096] [--batch-size 256]
    python benchmarks/cka_speed.py --update   # MinibatchCKA.update alone (no torch-cka)

Models: the shipped Fashion-MNIST teacher resnet10t vs a mobilenetv3_small_050 student
(random init), all 5 stages each; Fashion-MNIST test images. Both tools see identical
batches (no shuffling, drop_last) and both compute HSIC_1 on linear Grams of flattened
features, so their matrices should agree up to float32 rounding in torch-cka.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "teachers" / "weights" / "fmnist_resnet10t" / "model.safetensors"


def _setup(n: int, batch_size: int):
    import torch
    from torch.utils.data import DataLoader

    from visdistill import Backbone, FashionMNISTDataModule

    torch.manual_seed(0)
    a = Backbone("resnet10t", num_classes=10, checkpoint=str(TEACHER)).eval()
    b = Backbone("mobilenetv3_small_050", num_classes=10).eval()
    dm = FashionMNISTDataModule(test_subset=n, augment=False)
    dm.setup("test")
    loader = DataLoader(dm.test_set, batch_size=batch_size, shuffle=False, drop_last=True)
    return a, b, loader


def worker(method: str, n: int, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(2)
    a, b, loader = _setup(n, batch_size)
    stages_a, stages_b = list(range(len(a.feature_info))), list(range(len(b.feature_info)))
    start = time.perf_counter()
    if method == "visdistill":
        from visdistill.diagnostics import cka_matrix

        matrix, _, _ = cka_matrix(a, b, loader, stages_a, stages_b, progress=False)
    else:
        from torch.utils.data import DataLoader, TensorDataset
        from torch_cka import CKA

        # torch-cka runs models on (x, ...) tuples: give it the normalised tensors (both
        # models share ImageNet statistics here) and hook the same timm stage modules.
        images = torch.cat([batch["image"] for batch in loader])
        normed = a.preprocess(images)
        tensor_loader = DataLoader(TensorDataset(normed), batch_size=batch_size, shuffle=False)
        cka = CKA(
            a.model,
            b.model,
            "teacher",
            "student",
            model1_layers=[a.feature_info[s]["module"] for s in stages_a],
            model2_layers=[b.feature_info[s]["module"] for s in stages_b],
        )
        cka.compare(tensor_loader)
        matrix = cka.export()["CKA"]
    seconds = time.perf_counter() - start
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "n": n,
        "seconds": seconds,
        "max_rss_mb": max_rss_mb,
        "matrix": matrix.double().tolist(),
    }


def update_speed(batch_size: int, layers: int = 5, dim: int = 4096, reps: int = 20) -> None:
    """``MinibatchCKA.update`` (float32 Grams, batched HSIC_1 cross terms, float64 sums)
    against the plain float64 path (``gram_linear`` + ``hsic1`` row by row) on ``layers`` x
    ``layers`` ReLU-like ``dim``-d features of one batch; medians of ``reps`` runs."""
    import torch

    from visdistill.diagnostics import MinibatchCKA, gram_linear, hsic1

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(batch_size, 64, generator=g)

    def layer():
        w = torch.randn(64, dim, generator=g) / 8
        return torch.relu(base @ w + 0.5 * torch.randn(batch_size, dim, generator=g)) + 1.0

    feats_a, feats_b = [layer() for _ in range(layers)], [layer() for _ in range(layers)]

    def float64_path():
        grams_a = torch.stack([gram_linear(f) for f in feats_a])
        grams_b = torch.stack([gram_linear(f) for f in feats_b])
        s_ab = torch.stack([hsic1(k[None], grams_b) for k in grams_a])
        return s_ab / torch.sqrt(hsic1(grams_a, grams_a)[:, None] * hsic1(grams_b, grams_b))

    acc = MinibatchCKA(layers, layers)
    runs = {"float64": float64_path, "MinibatchCKA.update": lambda: acc.update(feats_a, feats_b)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps + 1):  # interleaved; the first round is a warm-up
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: sorted(t[1:])[reps // 2] * 1e3 for name, t in times.items()}
    acc.reset()
    acc.update(feats_a, feats_b)
    diff = (acc.compute() - float64_path()).abs().max().item()
    print(f"{layers}x{layers} layers, batch {batch_size}, {dim}-d features, median of {reps}:")
    for name, ms in medians.items():
        print(f"  {name:20s} {ms:7.1f} ms")
    print(
        f"  speed-up {medians['float64'] / medians['MinibatchCKA.update']:.2f}x, "
        f"max |CKA difference| {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--update", action="store_true", help="time MinibatchCKA.update alone, then exit"
    )
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.update:
        update_speed(ns.batch_size)
        return
    if ns.worker:
        print(json.dumps(worker(ns.worker[0], int(ns.worker[1]), ns.batch_size)))
        return
    import torch

    print(
        f"{'samples':>8} {'visdistill s':>13} {'torch-cka s':>12} {'speed-up':>9} "
        f"{'max |diff|':>11} {'RSS ours MB':>12} {'RSS torch-cka MB':>17}"
    )
    for n in ns.sizes:
        runs = {}
        for method in ("visdistill", "torch-cka"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    str(n),
                    "--batch-size",
                    str(ns.batch_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[method] = json.loads(out.stdout.strip().splitlines()[-1])
        ours, theirs = runs["visdistill"], runs["torch-cka"]
        diff = (torch.tensor(ours["matrix"]) - torch.tensor(theirs["matrix"])).abs().max().item()
        print(
            f"{n:>8} {ours['seconds']:>13.2f} {theirs['seconds']:>12.2f} "
            f"{theirs['seconds'] / ours['seconds']:>8.1f}x {diff:>11.2e} "
            f"{ours['max_rss_mb']:>12.0f} {theirs['max_rss_mb']:>17.0f}"
        )


if __name__ == "__main__":
    main()
