"""CKA between the stages of two models on a data set, written as a heat map
(what ``visdistill cka`` runs; its parameters are the command's options)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..data.by_name import datamodule_by_name
from ..errors import ConfigError
from ..export_config import read_export_config
from ..models import Backbone
from .heatmap import MATRIX_SUFFIXES, cka_matrix, plot_cka, save_cka


def compare_models(
    model_a: str | None = None,
    model_b: str | None = None,
    checkpoint_a: str | None = None,
    checkpoint_b: str | None = None,
    model_kwargs_a: dict[str, Any] | None = None,
    model_kwargs_b: dict[str, Any] | None = None,
    layers_a: Sequence[int] | str | None = None,
    layers_b: Sequence[int] | str | None = None,
    num_classes: int | None = None,
    data: str = "fashion_mnist",
    image_size: int = 32,
    num_samples: int = 2048,
    batch_size: int = 256,
    epochs: int = 1,
    seed: int = 0,
    out: str = "cka.png",
    matrix: str | None = None,
) -> tuple[Tensor, list[str], list[str]]:
    """Linear CKA (minibatch, unbiased HSIC_1; Nguyen et al., ICLR 2021) between the stages of
    two models; writes a PNG heat map and optionally the matrix. Returns ``(matrix (P, Q),
    row labels, column labels)``.

    Args:
        model_a: timm model name or zoo:<name>; default: the architecture in the config.json
            beside checkpoint_a (what `visdistill export` writes).
        model_b: as model_a, for the second model (the columns).
        checkpoint_a: weights file of model A.
        checkpoint_b: weights file of model B.
        model_kwargs_a: timm keyword arguments of model A (on the command line: a JSON or
            YAML mapping, e.g. '{"img_size": 32}').
        model_kwargs_b: timm keyword arguments of model B.
        layers_a: stage indices of model A, e.g. 0,2,4 (default: all).
        layers_b: stage indices of model B.
        num_classes: classifier width; default: the config.json beside each checkpoint,
            else the model's.
        data: digits, fashion_mnist (or fashion-mnist), or an image folder.
        image_size: input side.
        num_samples: test images used.
        batch_size: images per CKA minibatch (at least 4).
        epochs: passes over the samples.
        seed: seed of the sample order.
        out: the PNG heat map.
        matrix: also write the matrix (.json or .csv).
    """
    # Fail before loading anything: these are the cheap mistakes.
    if batch_size < 4:
        raise ConfigError(
            f"--batch_size {batch_size} is too small: the unbiased HSIC_1 estimator needs "
            "at least 4 examples per batch; use --batch_size 4 or more (256 is a good default)"
        )
    if matrix and Path(matrix).suffix.lower() not in MATRIX_SUFFIXES:
        suffix = Path(matrix).suffix
        raise ConfigError(
            f"--matrix {matrix}: {f'suffix {suffix!r}' if suffix else 'no suffix'} is not a "
            f"matrix format; the file name must end in {' or '.join(MATRIX_SUFFIXES)} "
            "(the format follows the suffix)"
        )
    if num_samples < batch_size:
        raise ConfigError(
            f"--num_samples {num_samples} is fewer than one batch of --batch_size "
            f"{batch_size}; lower --batch_size or raise --num_samples"
        )
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    specs = [
        _backbone_kwargs("a", model_a, checkpoint_a, model_kwargs_a, num_classes),
        _backbone_kwargs("b", model_b, checkpoint_b, model_kwargs_b, num_classes),
    ]
    models = [Backbone(**spec) for spec in specs]
    dm = datamodule_by_name(
        data,
        folder_as_test=True,
        test_subset=num_samples,
        image_size=image_size,
        augment=False,
        seed=seed,
    )
    dm.setup("test")
    dataset = dm.test_set
    if len(dataset) < max(batch_size, 4):
        raise ConfigError(
            f"{len(dataset)} samples are fewer than one batch of {batch_size}; "
            "lower --batch_size or raise --num_samples"
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    result, rows, cols = cka_matrix(
        models[0], models[1], loader, _stages(layers_a), _stages(layers_b), epochs
    )
    plot_cka(result, rows, cols, out, title=f"{specs[0]['name']} vs {specs[1]['name']} ({data})")
    print(f"wrote {out}")
    if matrix:
        save_cka(result, rows, cols, matrix)
        print(f"wrote {matrix}")
    return result, rows, cols


def _stages(layers: Sequence[int] | str | None) -> list[int] | None:
    if layers is None or layers == "":
        return None
    if not isinstance(layers, str):
        return [int(s) for s in layers]
    try:
        return [int(s) for s in layers.split(",")]
    except ValueError as e:
        raise ConfigError(
            f"layers must be comma-separated stage indices like 0,2,4; got {layers!r}"
        ) from e


def _backbone_kwargs(
    side: str,
    model: str | None,
    checkpoint: str | None,
    model_kwargs: dict[str, Any] | None,
    num_classes: int | None,
) -> dict[str, Any]:
    """``Backbone`` arguments for one side: explicit arguments win; the exported
    ``config.json`` beside the checkpoint fills in the architecture, ``num_classes``, timm
    kwargs and input normalisation."""
    explicit_kwargs = dict(model_kwargs or {})
    config = None
    if checkpoint:
        config = read_export_config(
            Path(checkpoint).parent,
            f"it sits beside --checkpoint_{side}: fix or remove it, or pass --model_{side} and "
            "--num_classes",
        )
    if model is None:
        model = (config or {}).get("architecture")
        if not model:
            where = (
                f"{Path(checkpoint).parent / 'config.json'} has no architecture"
                if config is not None
                else f"no config.json beside --checkpoint_{side}"
                if checkpoint
                else f"no --checkpoint_{side} with an exported config.json"
            )
            raise ConfigError(f"--model_{side} is required ({where}); give a timm model name")
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
