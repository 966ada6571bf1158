"""``visdistill cka``: a CKA heat map between the stages of two models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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


def _exported_config(checkpoint: str) -> dict[str, Any] | None:
    """The timm ``config.json`` next to a weights file (what ``visdistill export`` writes),
    or ``None`` when there is none."""
    path = Path(checkpoint).parent / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise TypeError(f"expected a JSON object, got {type(config).__name__}")
        if "num_classes" in config:
            config["num_classes"] = int(config["num_classes"])
        if not isinstance(config.get("architecture", ""), str):
            raise TypeError("architecture is not a string")
        if not isinstance(config.get("model_args", {}), dict):
            raise TypeError("model_args is not an object")
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{path} (beside the checkpoint) is not a usable timm config ({e}); fix or remove "
            "it, or pass --model-* and --num-classes"
        ) from e
    return config


def _backbone_kwargs(
    side: str, model: str | None, checkpoint: str | None, model_kwargs: str, num_classes: int | None
) -> dict[str, Any]:
    """``Backbone`` arguments for one side: explicit flags win; the exported ``config.json``
    beside the checkpoint fills in the architecture, ``num_classes``, timm kwargs and input
    normalisation."""
    try:
        explicit_kwargs = json.loads(model_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs-{side} is not valid JSON: {e}") from e
    config = _exported_config(checkpoint) if checkpoint else None
    if model is None:
        model = (config or {}).get("architecture")
        if not model:
            where = (
                f"{Path(checkpoint).parent / 'config.json'} has no architecture"
                if config is not None
                else f"no config.json beside --checkpoint-{side}"
                if checkpoint
                else f"no --checkpoint-{side} with an exported config.json"
            )
            raise ConfigError(f"--model-{side} is required ({where}); give a timm model name")
    kwargs: dict[str, Any] = {"name": model, "checkpoint": checkpoint}
    if num_classes is None and config is not None:
        num_classes = config.get("num_classes")
    kwargs["num_classes"] = num_classes
    if config is not None and model == config.get("architecture"):
        # The exported model itself: rebuild it as export described it.
        model_args = dict(config.get("model_args", {}))
        if "in_chans" in model_args:
            kwargs["in_chans"] = int(model_args.pop("in_chans"))
        explicit_kwargs = {**model_args, **explicit_kwargs}
        pretrained_cfg = config.get("pretrained_cfg") or {}
        for key in ("mean", "std", "interpolation"):
            if pretrained_cfg.get(key) is not None:
                kwargs[key] = pretrained_cfg[key]
        if pretrained_cfg.get("fixed_input_size") and pretrained_cfg.get("input_size"):
            kwargs["input_size"] = tuple(pretrained_cfg["input_size"][-2:])
    kwargs["model_kwargs"] = explicit_kwargs
    return kwargs


def cka_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="visdistill cka",
        description="Linear CKA (minibatch, unbiased HSIC_1) between the stages of two models; "
        "writes a PNG heat map and optionally the matrix.",
    )
    for side in ("a", "b"):
        parser.add_argument(
            f"--model-{side}",
            default=None,
            help="timm model name or zoo:<name>; default: the architecture in the config.json "
            f"beside --checkpoint-{side} (what `visdistill export` writes)",
        )
        parser.add_argument(f"--checkpoint-{side}", default=None, help="weights file")
        parser.add_argument(f"--model-kwargs-{side}", default="{}", help="JSON timm kwargs")
        parser.add_argument(f"--layers-{side}", default=None, help="stage indices, e.g. 0,2,4")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier width; default: the config.json beside each checkpoint, else the model's",
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
    if ns.matrix and Path(ns.matrix).suffix.lower() not in MATRIX_SUFFIXES:
        suffix = Path(ns.matrix).suffix
        raise ConfigError(
            f"--matrix {ns.matrix}: {f'suffix {suffix!r}' if suffix else 'no suffix'} is not a "
            f"matrix format; the file name must end in {' or '.join(MATRIX_SUFFIXES)} "
            "(the format follows the suffix)"
        )
    if ns.num_samples < ns.batch_size:
        raise ConfigError(
            f"--num-samples {ns.num_samples} is fewer than one batch of --batch-size "
            f"{ns.batch_size}; lower --batch-size or raise --num-samples"
        )
    if ns.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {ns.epochs}")
    specs = [
        _backbone_kwargs(
            side,
            getattr(ns, f"model_{side}"),
            getattr(ns, f"checkpoint_{side}"),
            getattr(ns, f"model_kwargs_{side}"),
            ns.num_classes,
        )
        for side in ("a", "b")
    ]
    models = [Backbone(**spec) for spec in specs]
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
    plot_cka(
        matrix, rows, cols, ns.out, title=f"{specs[0]['name']} vs {specs[1]['name']} ({ns.data})"
    )
    print(f"wrote {ns.out}")
    if ns.matrix:
        save_cka(matrix, rows, cols, ns.matrix)
        print(f"wrote {ns.matrix}")
