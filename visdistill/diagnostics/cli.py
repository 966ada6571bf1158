"""``visdistill cka``: a CKA heat map between the stages of two models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..models import Backbone
from .heatmap import cka_matrix, plot_cka, save_cka


def _stages(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError as e:
        raise ConfigError(
            f"layers must be comma-separated stage indices like 0,2,4; got {text!r}"
        ) from e


def _dataset(data: str, num_samples: int | None, image_size: int, seed: int):
    from ..data import DigitsDataModule, FashionMNISTDataModule, ImageFolderDataModule

    kwargs = dict(test_subset=num_samples, image_size=image_size, augment=False, seed=seed)
    if data == "digits":
        dm = DigitsDataModule(**kwargs)
    elif data == "fashion-mnist":
        dm = FashionMNISTDataModule(**kwargs)
    elif Path(data).is_dir():
        dm = ImageFolderDataModule(train_dir=data, test_dir=data, **kwargs)
    else:
        raise ConfigError(
            f"--data must be 'digits', 'fashion-mnist' or an image folder; {data!r} is none "
            f"(no directory at {Path(data).resolve()})"
        )
    dm.setup("test")
    return dm.test_set


def cka_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="visdistill cka",
        description="Linear CKA (minibatch, unbiased HSIC_1) between the stages of two models; "
        "writes a PNG heat map and optionally the matrix.",
    )
    for side in ("a", "b"):
        parser.add_argument(f"--model-{side}", required=True, help="timm model name")
        parser.add_argument(f"--checkpoint-{side}", default=None, help="weights file")
        parser.add_argument(f"--model-kwargs-{side}", default="{}", help="JSON timm kwargs")
        parser.add_argument(f"--layers-{side}", default=None, help="stage indices, e.g. 0,2,4")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--data", default="fashion-mnist", help="digits | fashion-mnist | folder")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="cka.png", help="PNG heat map")
    parser.add_argument("--matrix", default=None, help="also write the matrix (.json or .csv)")
    ns = parser.parse_args(args)

    models = []
    for side in ("a", "b"):
        try:
            kwargs = json.loads(getattr(ns, f"model_kwargs_{side}"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-kwargs-{side} is not valid JSON: {e}") from e
        models.append(
            Backbone(
                getattr(ns, f"model_{side}"),
                num_classes=ns.num_classes,
                checkpoint=getattr(ns, f"checkpoint_{side}"),
                model_kwargs=kwargs,
            )
        )
    dataset = _dataset(ns.data, ns.num_samples, ns.image_size, ns.seed)
    if len(dataset) < max(ns.batch_size, 4):
        raise ConfigError(
            f"{len(dataset)} samples are fewer than one batch of {ns.batch_size}; "
            "lower --batch-size or raise --num-samples"
        )
    loader = DataLoader(
        dataset,
        batch_size=ns.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(ns.seed),
    )
    matrix, rows, cols = cka_matrix(
        models[0], models[1], loader, _stages(ns.layers_a), _stages(ns.layers_b), ns.epochs
    )
    plot_cka(matrix, rows, cols, ns.out, title=f"{ns.model_a} vs {ns.model_b} ({ns.data})")
    print(f"wrote {ns.out}")
    if ns.matrix:
        save_cka(matrix, rows, cols, ns.matrix)
        print(f"wrote {ns.matrix}")
