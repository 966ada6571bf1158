"""Fashion-MNIST mosaics: a small real-image detection set in COCO format, with exact boxes.

Items (28x28 Fashion-MNIST images, scaled by an integer factor with nearest-neighbour so no pixel
is interpolated) are pasted without overlap on a black canvas. Each item is cropped to the tight
extent of its non-zero pixels before pasting, so its box ``[x, y, w, h]`` covers exactly the pixels
it put on the canvas; its category is the item's Fashion-MNIST class. The ``train`` mosaics take
items from Fashion-MNIST's training split, ``val`` and ``test`` from its test split, so evaluation
never sees a training item.

Needs numpy and Pillow only (no mmdet): ``python scripts/make_mosaic_coco.py --out data/mosaic``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.fashion_mnist import CLASSES, FashionMNISTDataModule
from ..errors import ConfigError

SOURCE_SPLIT = {"train": True, "val": False, "test": False}
SPLIT_SEED = {"train": 0, "val": 1, "test": 2}  # different item draws per split for one seed


@dataclass(frozen=True)
class MosaicSpec:
    """How a mosaic split is drawn.

    Args:
        num_images: images in the split.
        image_size: canvas side in pixels.
        min_items, max_items: items per image (uniform, inclusive).
        scales: integer up-scaling factors an item is drawn with (uniform).
        seed: base seed; each split offsets it, so ``train`` and ``val`` differ.
    """

    num_images: int = 64
    image_size: int = 128
    min_items: int = 1
    max_items: int = 4
    scales: tuple[int, ...] = (1, 2)
    seed: int = 0

    def check(self) -> None:
        if self.num_images < 1:
            raise ConfigError(f"num_images must be >= 1, got {self.num_images}")
        if not 1 <= self.min_items <= self.max_items:
            raise ConfigError(
                f"need 1 <= min_items <= max_items, got {self.min_items}, {self.max_items}"
            )
        if not self.scales or any(int(s) != s or s < 1 for s in self.scales):
            raise ConfigError(f"scales must be positive integers, got {self.scales}")
        if 28 * max(self.scales) > self.image_size:
            raise ConfigError(
                f"an item at scale {max(self.scales)} is {28 * max(self.scales)} px, larger than "
                f"the {self.image_size} px canvas: lower scales or raise image_size"
            )


def tight_crop(item: np.ndarray) -> np.ndarray:
    """The ``(h, w)`` sub-array spanning the non-zero pixels of a 2-D image."""
    rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
    if rows.size == 0:
        return item[:0, :0]
    return item[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _overlaps(box: tuple[int, int, int, int], boxes: Sequence[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    return any(
        x < bx + bw and bx < x + w and y < by + bh and by < y + h for bx, by, bw, bh in boxes
    )


def draw_mosaics(
    items: np.ndarray, labels: np.ndarray, spec: MosaicSpec, seed: int
) -> tuple[list[np.ndarray], list[list[dict]]]:
    """Draw ``spec.num_images`` canvases from ``items`` ``(N, 28, 28)`` uint8 and ``labels`` ``(N,)``.

    Returns the ``(S, S)`` uint8 canvases and, per canvas, its objects
    ``{"bbox": [x, y, w, h], "label": k, "item": n}`` (``k`` in ``0..9``, ``n`` the item's index).
    """
    spec.check()
    rng = np.random.default_rng(seed)
    size = spec.image_size
    canvases, objects = [], []
    for _ in range(spec.num_images):
        canvas = np.zeros((size, size), dtype=np.uint8)
        placed: list[dict] = []
        wanted = int(rng.integers(spec.min_items, spec.max_items + 1))
        tries = 0
        while len(placed) < wanted and tries < 50 * wanted:
            tries += 1
            n = int(rng.integers(len(items)))
            scale = int(rng.choice(spec.scales))
            crop = tight_crop(items[n])
            if crop.size == 0:
                continue
            crop = crop.repeat(scale, 0).repeat(scale, 1)
            h, w = crop.shape
            x, y = int(rng.integers(size - w + 1)), int(rng.integers(size - h + 1))
            if _overlaps((x, y, w, h), [o["bbox"] for o in placed]):
                continue
            canvas[y : y + h, x : x + w] = crop
            placed.append({"bbox": [x, y, w, h], "label": int(labels[n]), "item": n})
        canvases.append(canvas)
        objects.append(placed)
    return canvases, objects


def fashion_mnist_items(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's ``(N, 28, 28)`` uint8 images and ``(N,)`` labels, read by visdistill's reader."""
    images, targets = FashionMNISTDataModule().load(train=train)
    return images[:, 0, 2:30, 2:30].numpy(), targets.numpy()  # undo the reader's 2 px padding


def write_coco_split(out_dir: str | Path, split: str, spec: MosaicSpec) -> Path:
    """Write ``out_dir/<split>/*.png`` and ``out_dir/annotations/<split>.json`` (COCO detection
    format, category ids 1..10 named as Fashion-MNIST's classes). Returns the json path."""
    if split not in SOURCE_SPLIT:
        raise ConfigError(f"unknown split {split!r}: choose one of {sorted(SOURCE_SPLIT)}")
    from PIL import Image  # matplotlib's dependency; imported here to keep the module light

    out_dir = Path(out_dir)
    items, labels = fashion_mnist_items(SOURCE_SPLIT[split])
    canvases, objects = draw_mosaics(items, labels, spec, seed=spec.seed * 10 + SPLIT_SEED[split])
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (canvas, objs) in enumerate(zip(canvases, objects, strict=True)):
        name = f"{i:06d}.png"
        Image.fromarray(canvas, mode="L").save(out_dir / split / name)
        images.append(
            {"id": i + 1, "file_name": name, "width": spec.image_size, "height": spec.image_size}
        )
        for o in objs:
            x, y, w, h = o["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": o["label"] + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "fashion_mnist_index": o["item"],
                }
            )
    coco = {
        "info": {
            "description": f"Fashion-MNIST mosaics ({split}), visdistill.integrations.mosaic_coco",
            "source_split": "train" if SOURCE_SPLIT[split] else "test",
            "spec": asdict(spec),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)],
    }
    path = out_dir / "annotations" / f"{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(path)
    return path


def make_mosaic_coco(
    out_dir: str | Path,
    splits: dict[str, int] | None = None,
    image_size: int = 128,
    min_items: int = 1,
    max_items: int = 4,
    scales: Sequence[int] = (1, 2),
    seed: int = 0,
) -> dict[str, Path]:
    """Write the mosaic splits (default ``{"train": 64, "val": 32}`` images) under ``out_dir``.

    Returns ``{split: annotation json path}``.
    """
    splits = splits or {"train": 64, "val": 32}
    paths = {}
    for split, n in splits.items():
        spec = MosaicSpec(n, image_size, min_items, max_items, tuple(int(s) for s in scales), seed)
        paths[split] = write_coco_split(out_dir, split, spec)
    return paths
