"""Is reading the teacher cache faster than decoding the images it replaces?

    python benchmarks/cache_read.py                      # 1024 images, 1 thread
    python benchmarks/cache_read.py --images 1797 --threads 2 --json out.json

Writes a 64 px PNG image folder from scikit-learn's digits (into a temporary folder), then
measures, one after the other in one process:

- ``decode``: what a training loader does per image without a cache's help: PNG decode
  (PIL) + timm's ``create_transform`` train augmentation (RandomResizedCrop,
  ``rand-m9-mstd0.5`` RandAugment, random erasing), replayed per (epoch, index), in the
  main process (``num_workers 0``). Images/s.
- ``cache (logits)`` and ``cache (features)``: :meth:`TeacherCache.lookup` for the same
  images in training-batch order (what a cached training step reads: one contiguous run of
  a shard per batch) and in random order (batches of random samples across shards), for a
  cache of 3 teachers' top-10 log-probabilities, then with each teacher's pooled features
  and one stage map (fp16). Images/s, and bytes per image-epoch on disk.

Teachers are random-initialised timm models at 64 px (resnet10t, a 2-block ViT-Tiny with
8 px patches, convnext_atto); their feature sizes set the bytes per image-epoch with features.
The numbers are printed and, with ``--json``, written there. On a shared machine mark them
as measured under load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from visdistill import KD, DistillationModule, ImageFolderDataModule, ModelConfig
from visdistill.teacher_cache import TeacherCache, build_teacher_cache

SIZE = 64
TEACHERS = [
    dict(name="resnet10t", num_classes=10),
    dict(name="vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(img_size=SIZE, patch_size=8, depth=2)),
    dict(name="convnext_atto", num_classes=10),
]  # fmt: skip
AUGMENT = dict(scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5", re_prob=0.25)


def write_folder(root: Path, images: int) -> Path:
    """``images`` digits as 64 px RGB PNGs in class folders (repeating the 1797 if asked
    for more)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(images):
        j = i % len(digits.images)
        img = Image.fromarray((digits.images[j] * 255 / 16).astype(np.uint8))
        folder = root / str(digits.target[j])
        folder.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(folder / f"{i:05d}.png")
    return root


def data(root: Path, batch_size: int) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        train_dir=str(root), image_size=SIZE, batch_size=batch_size, val_split=0, **AUGMENT
    )
    dm.setup("fit")
    return dm


def time_decode(dm: ImageFolderDataModule, repeats: int) -> float:
    """Images/s of the training loader (decode + replayed timm transform + collate)."""
    loader = dm.train_dataloader()
    n, start = 0, time.perf_counter()
    for epoch in range(repeats):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            n += len(batch["index"])
    return n / (time.perf_counter() - start)


def time_lookups(cache: TeacherCache, batches: list[tuple[int, torch.Tensor]], repeats: int):
    n, start = 0, time.perf_counter()
    for _ in range(repeats):
        for epoch, index in batches:
            cache.lookup(epoch, index)
            n += len(index)
    return n / (time.perf_counter() - start)


def loader_batches(dm: ImageFolderDataModule, epoch: int) -> list[tuple[int, torch.Tensor]]:
    """The ``index`` of every training batch of ``epoch``, in order (no image is loaded)."""
    loader = dm.train_dataloader()
    order = loader.sampler.order(epoch)
    b = dm.batch_size
    indices = dm.train_set.indices[torch.tensor(order)]
    return [(epoch, indices[s : s + b]) for s in range(0, len(indices), b)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".npy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="epochs stored in the caches")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over each reader")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict[str, object] = {
        "images": args.images,
        "image_size": SIZE,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "teachers": [t["name"] for t in TEACHERS],
        "augmentation": AUGMENT,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_folder(tmp / "pngs", args.images)
        dm = data(root, args.batch_size)
        module = DistillationModule(
            student=ModelConfig(name="resnet10t", num_classes=10),
            teachers=[ModelConfig(**t) for t in TEACHERS],
            terms=[KD()],
        )
        decode = time_decode(dm, 1)
        results["decode_images_per_s"] = round(decode, 1)
        print(f"decode: PNG + timm RRC/RandAugment/erasing  {decode:10.0f} images/s", flush=True)
        variants = {
            "logits": dict(pooled=False, stages=[]),
            "features": dict(pooled=True, stages=[[-1], [-1], [-1]]),
        }
        rng = np.random.default_rng(0)
        for name, options in variants.items():
            start = time.perf_counter()
            out = build_teacher_cache(
                module, dm, tmp / name, epochs=args.epochs, top_k=10, progress=False,
                shard_size=512, **options,
            )  # fmt: skip
            build_s = time.perf_counter() - start
            cache = TeacherCache.open(out)
            in_order = loader_batches(dm, 0)
            everything = torch.cat([i for _, i in in_order]).numpy()
            shuffled = [
                (int(rng.integers(args.epochs)), torch.from_numpy(rng.choice(everything, len(i))))
                for _, i in in_order
            ]
            ordered = time_lookups(cache, in_order, args.repeats)
            random_ = time_lookups(cache, shuffled, args.repeats)
            per_image = folder_bytes(out) / (args.epochs * len(dm.train_set))
            results[f"cache_{name}"] = {
                "build_s": round(build_s, 2),
                "training_order_images_per_s": round(ordered, 1),
                "random_order_images_per_s": round(random_, 1),
                "bytes_per_image_epoch": round(per_image, 1),
                "feature_shapes": cache.manifest["feature_shapes"],
            }
            print(
                f"cache ({name}): training order {ordered:10.0f} images/s "
                f"({ordered / decode:.1f}x decode), random order {random_:10.0f} images/s "
                f"({random_ / decode:.1f}x), {per_image:.0f} bytes per image-epoch",
                flush=True,
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
