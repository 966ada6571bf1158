"""``visdistill cka``: a CKA heat map between the stages of two models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..models import Backbone
from .heatmap import MATRIX_SUFFIXES, cka_matrix, plot_cka, save_cka


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


def _num_classes_beside(checkpoint: str) -> int | None:
    """``num_classes`` from the timm ``config.json`` next to a weights file (what
    ``visdistill export`` writes), or ``None``."""
    config = Path(checkpoint).parent / "config.json"
    if not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["num_classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{config} has no usable num_classes ({e}); pass --num-classes") from e


def cka_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="visdistill cka",
        description="Linear CKA (minibatch, unbiased HSIC_1) between the stages of two models; "
        "writes a PNG heat map and optionally the matrix.",
    )
    for side in ("a", "b"):
        parser.add_argument(f"--model-{side}", required=True, help="timm model name or zoo:<name>")
        parser.add_argument(f"--checkpoint-{side}", default=None, help="weights file")
        parser.add_argument(f"--model-kwargs-{side}", default="{}", help="JSON timm kwargs")
        parser.add_argument(f"--layers-{side}", default=None, help="stage indices, e.g. 0,2,4")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier width; default: the config.json beside the checkpoint, or the model's",
    )
    parser.add_argument("--data", default="fashion-mnist", help="digits | fashion-mnist | folder")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="cka.png", help="PNG heat map")
    parser.add_argument("--matrix", default=None, help="also write the matrix (.json or .csv)")
    ns = parser.parse_args(args)
    # Fail before loading anything: these are the cheap mistakes.
    if ns.batch_size < 4:
        raise ConfigError(
            f"--batch-size {ns.batch_size} is too small: the unbiased HSIC_1 estimator needs "
            "at least 4 examples per batch; use --batch-size 4 or more (256 is a good default)"
        )
    if ns.matrix and Path(ns.matrix).suffix not in MATRIX_SUFFIXES:
        raise ConfigError(
            f"--matrix {ns.matrix}: the file name must end in {' or '.join(MATRIX_SUFFIXES)} "
            "(the format follows the suffix)"
        )

    models = []
    for side in ("a", "b"):
        try:
            kwargs = json.loads(getattr(ns, f"model_kwargs_{side}"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-kwargs-{side} is not valid JSON: {e}") from e
        checkpoint = getattr(ns, f"checkpoint_{side}")
        num_classes = ns.num_classes
        if num_classes is None and checkpoint:
            num_classes = _num_classes_beside(checkpoint)
        models.append(
            Backbone(
                getattr(ns, f"model_{side}"),
                num_classes=num_classes,
                checkpoint=checkpoint,
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
