"""Write the Fashion-MNIST mosaic detection set in COCO format.

python scripts/make_mosaic_coco.py --out data/mosaic --train 64 --val 32 --size 128
"""

from __future__ import annotations

import argparse

from visdistill.integrations.mosaic_coco import make_mosaic_coco


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="data/mosaic", help="output folder")
    p.add_argument("--train", type=int, default=64, help="training images")
    p.add_argument("--val", type=int, default=32, help="validation images")
    p.add_argument("--test", type=int, default=0, help="test images (0: none)")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    p.add_argument("--min-items", type=int, default=1)
    p.add_argument("--max-items", type=int, default=4)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2], help="integer item scales")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    splits = {k: v for k, v in {"train": a.train, "val": a.val, "test": a.test}.items() if v > 0}
    paths = make_mosaic_coco(a.out, splits, a.size, a.min_items, a.max_items, a.scales, a.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
