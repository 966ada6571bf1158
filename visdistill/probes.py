"""Frozen-feature evaluation: weighted kNN and linear-probe top-1 on labelled data.

A label-free distilled student (``num_classes: 0``, ``labels: false``) has no accuracy of
its own; these two probes measure how well its pooled features ``(B, D)`` separate the
classes of a labelled data set, the standard protocol of self-supervised and
agglomerative models (DINO, Caron et al., 2021, arXiv 2104.14294; AM-RADIO, UNIC):

- :func:`knn_classify`: DINO's weighted k-nearest-neighbour vote (no training);
- :func:`linear_probe`: a multinomial logistic regression fitted on the frozen features;
- :func:`probe_exported`: both, for a student written by ``visdistill export``.

The Lightning callbacks that log them during a fit are in :mod:`visdistill.probe_callbacks`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .data.base import UNLABELLED, VisionDataModule, subset
from .errors import CheckpointError, ConfigError
from .fast_path import use_channels_last

# The L2 strengths a linear probe sweeps by default (mean cross-entropy objective).
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# Query rows per similarity chunk: chunk * N train features stay below this many floats.
_SIMILARITY_BUDGET = 2**24


def _check_features(name: str, features: Tensor) -> None:
    if features.ndim != 2:
        raise ConfigError(f"{name} must be (N, D) features, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ConfigError(f"{name} must be floating point features, got {features.dtype}")


def _check_labels(name: str, labels: Tensor, n: int) -> None:
    if labels.ndim != 1 or len(labels) != n:
        raise ConfigError(f"{name} must be ({n},) class indices, got shape {tuple(labels.shape)}")
    if n and int(labels.min()) < 0:
        hint = " (-1: the data has no labels; give the probe labelled data)"
        raise ConfigError(
            f"{name} holds negative class indices{hint if int(labels.min()) == UNLABELLED else ''}"
        )


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    seen = max(int(y.max()) + 1 for y in labels if len(y)) if any(len(y) for y in labels) else 0
    if num_classes is None:
        return seen
    if num_classes < seen:
        raise ConfigError(
            f"num_classes={num_classes} but the labels go up to {seen - 1}; pass num_classes >= "
            f"{seen} (or leave it out)"
        )
    return num_classes


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Weighted kNN class predictions, as DINO's ``knn_classifier`` (Caron et al., 2021;
    github.com/facebookresearch/dino, ``eval_knn.py``).

    Both feature sets are L2-normalised (DINO normalises them after extraction), so the
    similarity is the cosine. Each query's
    ``k`` most similar train features vote for their class with weight
    ``exp(cos / temperature)``; the prediction is the class with the largest summed weight.
    DINO uses ``k = 20`` ("usually working the best") and ``temperature = 0.07``.

    Departures from DINO's code, none of which changes a prediction it makes: queries are
    processed in chunks of ``chunk_size`` (DINO's fixed 100 chunks fail below 100 queries);
    ``k`` larger than the number of train features uses them all (DINO fails); each query's
    weights are computed as ``exp((cos - max cos) / temperature)``, the same weights up to a
    per-query factor, so a small temperature cannot overflow. Ties between classes go to
    the lowest class index (``argmax``); ties in similarity at the ``k``-th place are broken
    by ``torch.topk``.

    Args:
        train_features: ``(N, D)`` reference features.
        train_labels: ``(N,)`` their class indices (``>= 0``).
        query_features: ``(Q, D)`` features to classify.
        k: neighbours per query (``min(k, N)`` are used).
        temperature: vote sharpness; smaller gives the nearest neighbours more weight.
        num_classes: number of classes; default ``max(train_labels) + 1``.
        chunk_size: queries per similarity block (memory ``chunk_size * N`` floats);
            default keeps a block below 16 M floats.

    Returns:
        ``(Q,)`` int64 predicted classes, on the features' device.
    """
    _check_features("train_features", train_features)
    _check_features("query_features", query_features)
    n = len(train_features)
    _check_labels("train_labels", train_labels, n)
    if n == 0:
        raise ConfigError("knn_classify needs at least one train feature, got none")
    if train_features.shape[1] != query_features.shape[1]:
        raise ConfigError(
            f"train features have {train_features.shape[1]} dims but query features "
            f"{query_features.shape[1]}: both must come from the same model"
        )
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1 (or None: automatic), got {chunk_size}")
    classes = _num_classes(num_classes, train_labels)
    chunk = chunk_size or max(1, _SIMILARITY_BUDGET // n)
    k = min(k, n)
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device)
    predictions = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start : start + chunk].float().to(train.device), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)  # (C, k), most similar first
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(len(query), classes, device=train.device)
        votes.scatter_add_(1, labels[idx], weights)
        predictions.append(votes.argmax(dim=1))
    if not predictions:
        return torch.zeros(0, dtype=torch.long, device=train.device)
    return torch.cat(predictions)


@dataclass
class LinearProbeResult:
    """What :func:`linear_probe` found.

    Attributes:
        top1: fraction of the validation features classified correctly, in ``[0, 1]``.
        weight_decay: the L2 strength chosen by the sweep (and used for the final fit).
        sweep: ``{weight decay: top-1 on the held-out part of train}`` (empty when one
            weight decay was given: no sweep).
        predictions: ``(M,)`` predicted classes of the validation features.
    """

    top1: float
    weight_decay: float
    sweep: dict[float, float] = field(default_factory=dict)
    predictions: Tensor | None = None


def _fit_logistic(
    x: Tensor,
    y: Tensor,
    classes: int,
    weight_decay: float,
    max_iter: int,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + ``weight_decay / 2 * ||W||^2``
    (the bias is not penalised), full-batch L-BFGS from ``start`` (default zeros): a
    convex problem, so the result does not depend on a seed."""
    if start is None:
        start = (x.new_zeros(classes, x.shape[1]), x.new_zeros(classes))
    with torch.inference_mode(False):
        weight = start[0].clone().requires_grad_(True)
        bias = start[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), y)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.inference_mode(False), torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(predictions: Tensor, labels: Tensor) -> float:
    return (
        float((predictions == labels.to(predictions.device)).double().mean())
        if len(labels)
        else 0.0
    )


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    holdout: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> LinearProbeResult:
    """Top-1 of a logistic-regression probe on frozen features.

    Features are standardised with the train features' per-dimension mean and standard
    deviation (population std, as scikit-learn's ``StandardScaler``; constant dimensions are only centred). A multinomial logistic regression
    (mean cross-entropy plus ``weight_decay / 2 * ||W||^2``; the bias is not penalised) is
    fitted by full-batch L-BFGS in float64 from zero weights. With several
    ``weight_decays``, each is fitted on train minus a seeded held-out ``holdout``
    fraction and scored on that held-out part; the best (the largest on a tie) is refitted
    on all train features and scored on the validation features. The validation features
    never choose anything. Deterministic: the split is seeded and the problem is convex.

    A scikit-learn ``LogisticRegression(C=C)`` fitted on ``N`` samples minimises the same
    objective with ``weight_decay = 1 / (C * N)``.

    Args:
        train_features, train_labels: ``(N, D)`` features and ``(N,)`` class indices the
            probe is fitted on.
        val_features, val_labels: ``(M, D)`` and ``(M,)``: what it is scored on.
        num_classes: default ``max(label) + 1`` over both label sets.
        weight_decays: L2 strengths swept (one value: no sweep, no hold-out).
        holdout: fraction of train held out to choose the weight decay.
        max_iter: L-BFGS iterations per fit.
        seed: draws the held-out part.
    """
    _check_features("train_features", train_features)
    _check_features("val_features", val_features)
    _check_labels("train_labels", train_labels, len(train_features))
    _check_labels("val_labels", val_labels, len(val_features))
    if train_features.shape[1] != val_features.shape[1]:
        raise ConfigError(
            f"train features have {train_features.shape[1]} dims but validation features "
            f"{val_features.shape[1]}: both must come from the same model"
        )
    if not weight_decays or any(wd < 0 for wd in weight_decays):
        raise ConfigError(f"weight_decays must be one or more values >= 0, got {weight_decays}")
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout}")
    n = len(train_features)
    n_hold = max(1, round(holdout * n))
    if n < 2:
        raise ConfigError(f"linear_probe needs at least 2 train features, got {n}")
    classes = _num_classes(num_classes, train_labels, val_labels)
    # Called from validation hooks, which may run under inference_mode: the fits need
    # autograd and tensors created outside it.
    with torch.inference_mode(False):
        x = train_features.double()
        mean, std = x.mean(0), x.std(0, correction=0)
        std = torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
        x = (x - mean) / std
        y = train_labels.to(x.device).clone()  # a normal tensor, not an inference one
        sweep: dict[float, float] = {}
        if len(set(weight_decays)) > 1:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
            hold, fit = perm[:n_hold], perm[n_hold:]
            solution = None
            # Strongest first, each fit starting from the previous solution (a regularisation
            # path): the weakly regularised fits, the slow ones, start close to their optimum.
            for wd in sorted({float(w) for w in weight_decays}, reverse=True):
                solution = _fit_logistic(x[fit], y[fit], classes, wd, max_iter, solution)
                sweep[wd] = _accuracy(F.linear(x[hold], *solution).argmax(1), y[hold])
        best = max(sweep, key=lambda wd: (sweep[wd], wd)) if sweep else float(weight_decays[0])
        weight, bias = _fit_logistic(x, y, classes, best, max_iter)
        xv = (val_features.double().to(x.device) - mean) / std
        predictions = F.linear(xv, weight, bias).argmax(1)
    return LinearProbeResult(_accuracy(predictions, val_labels), best, sweep, predictions)


# --- labelled data for the probes -------------------------------------------------------


def probe_datamodule(data: VisionDataModule) -> VisionDataModule:
    """The data module a probe reads: ``data`` itself when it has labels and no
    augmentation, else a new one of the same class and settings with ``labels: true`` and
    ``augment: false`` (the same splits: they are seeded by ``seed``). A run trained with
    ``labels: false`` is probed on the labels its data does have.

    Raises:
        ConfigError: the data has no labels at all (a flat image folder), or is not a
            visdistill data module.
    """
    if not isinstance(data, VisionDataModule):
        raise ConfigError(
            f"the probes read a visdistill data module (VisionDataModule: DigitsDataModule, "
            f"ImageFolderDataModule, ...), got {type(data).__name__}"
        )
    if data.has_labels and not data.augment:
        return data
    # Keys starting with "_" are LightningCLI's records (_class_path, _instantiator).
    settings = {k: v for k, v in dict(data.hparams).items() if not k.startswith("_")}
    try:
        copy = type(data)(**{**settings, "labels": True, "augment": False})
    except TypeError as e:
        raise ConfigError(
            f"could not rebuild {type(data).__name__} from its hyper-parameters with labels on "
            f"and augmentation off ({e}); give the probe a data module built with "
            "`labels: true, augment: false`"
        ) from e
    if not copy.has_labels:
        raise ConfigError(
            f"{type(data).__name__} has no labels (an image folder without class sub-folders?); "
            "the kNN and linear probes need labelled data: give them a labelled data module "
            "(the probe callbacks' `data:` option, probe_exported's `data`)"
        )
    return copy


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | Tensor,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    convert_input: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Pooled features ``(n, D)`` (float32) and targets ``(n,)`` of ``dataset[indices]``,
    in that order, from a :class:`~visdistill.models.Backbone` in eval mode under
    ``no_grad`` (its train/eval mode is restored after). ``context`` wraps each forward
    and ``convert_input`` casts each ``(B, 3, H, W)`` batch (a trainer's precision
    plugin's ``forward_context`` and ``convert_input``)."""
    loader = DataLoader(
        Subset(dataset, [int(i) for i in indices]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    was_training = model.training
    model.eval()
    features, targets = [], []
    try:
        for batch in loader:
            images = batch["image"].to(device)
            if convert_input is not None:
                images = convert_input(images)
            with context():
                out = model(images, pooled=True)
            features.append(out.pooled.float())
            targets.append(batch["target"].to(device))
    finally:
        model.train(was_training)
    if not features:
        width = getattr(model, "num_features", 0)
        return torch.zeros(0, width, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(targets)


def reference_indices(n: int, limit: int | None, seed: int) -> Tensor:
    """All of ``range(n)``, or a seeded random ``limit`` of it (sorted): the capped
    reference (or query) set of a probe."""
    if limit is not None and limit < 1:
        raise ConfigError(f"a probe's sample cap must be >= 1 (or null for all), got {limit}")
    return subset(n, limit, seed)


# --- an exported student ----------------------------------------------------------------


def probe_exported(
    export_dir: str | Path,
    data: VisionDataModule,
    k: int = 20,
    temperature: float = 0.07,
    linear: bool = True,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    split: str = "test",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    seed: int = 0,
    channels_last: bool = True,
) -> dict[str, Any]:
    """kNN (and linear-probe) top-1 of a student written by ``visdistill export``.

    The folder (``model.safetensors`` + ``config.json``) is loaded as timm does,
    ``timm.create_model("local-dir:<export_dir>", pretrained=True)``, and runs at the input
    size, mean and std recorded in it. Its pooled features (pre-logits; what a headless
    student outputs) of ``data``'s training split are the reference set, those of ``split``
    are classified. ``data`` is read with labels and without augmentation
    (:func:`probe_datamodule`).

    Args:
        export_dir: the export folder.
        data: a labelled visdistill data module (``labels: false`` is turned back on).
        k, temperature: :func:`knn_classify`.
        linear: also fit :func:`linear_probe` (its weight-decay sweep holds out 20 % of the
            reference set).
        weight_decays: the linear probe's L2 strengths.
        split: ``"test"`` (the data's test split) or ``"val"`` (its validation split).
        max_train_samples, max_eval_samples: seeded random caps on the two sets.
        batch_size: images per forward pass.
        device: default ``cuda`` when available, else ``cpu``.
        seed: draws the capped subsets and the linear probe's held-out part.
        channels_last: run the student in ``channels_last`` memory format on CPU and CUDA
            (faster; it is the format a fit trains in by default, so the figures the fit's
            probe callbacks logged are reproduced exactly, not up to float rounding).

    Returns:
        ``{"knn_top1", "linear_top1" (when linear), "linear_weight_decay", "k",
        "temperature", "split", "num_train", "num_eval", "num_classes", "feature_dim"}``;
        top-1 values are fractions in ``[0, 1]``.
    """
    from .models import Backbone

    folder = Path(export_dir)
    config_path = folder / "config.json"
    if not config_path.is_file() or not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"{folder} is not a `visdistill export` folder (it needs config.json and "
            "model.safetensors); export a checkpoint with `visdistill export CKPT --out DIR`"
        )
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}")
    if k < 1 or not temperature > 0:
        raise ConfigError(
            f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}"
        )
    try:
        config = json.loads(config_path.read_text())
        size = config.get("pretrained_cfg", {}).get("input_size")
        in_chans = int(config.get("model_args", {}).get("in_chans", 3))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a readable timm config: {e}") from e
    student = Backbone(
        f"local-dir:{folder.resolve()}",
        pretrained=True,
        input_size=tuple(size[-2:]) if size else None,
        in_chans=in_chans,
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student.to(dev)
    use_channels_last(student, dev, channels_last)
    probe_data = probe_datamodule(data)
    probe_data.setup("fit")
    if split == "test":
        probe_data.setup("test")
    reference = probe_data.train_set
    evaluated = probe_data.test_set if split == "test" else probe_data.val_set
    if evaluated is None or len(evaluated) == 0:
        raise ConfigError(f"{type(data).__name__} has no {split} samples to probe")
    workers = probe_data.num_workers
    train_x, train_y = extract_features(
        student,
        reference,
        reference_indices(len(reference), max_train_samples, seed),
        batch_size,
        workers,
        dev,
    )
    eval_x, eval_y = extract_features(
        student,
        evaluated,
        reference_indices(len(evaluated), max_eval_samples, seed),
        batch_size,
        workers,
        dev,
    )
    classes = max(probe_data.num_classes, _num_classes(None, train_y, eval_y))
    knn = knn_classify(train_x, train_y, eval_x, k, temperature, num_classes=classes)
    result: dict[str, Any] = {
        "knn_top1": _accuracy(knn, eval_y),
        "k": k,
        "temperature": temperature,
        "split": split,
        "num_train": len(train_y),
        "num_eval": len(eval_y),
        "num_classes": classes,
        "feature_dim": train_x.shape[1],
    }
    if linear:
        probe = linear_probe(
            train_x, train_y, eval_x, eval_y, classes, weight_decays=weight_decays, seed=seed
        )
        result["linear_top1"] = probe.top1
        result["linear_weight_decay"] = probe.weight_decay
    return result
