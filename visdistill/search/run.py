"""A whole DisWOT student search: rank timm students for a teacher, write a fit config.

:func:`run_search` is what ``visdistill search`` runs (its parameters are the command's
options)::

    visdistill search --teacher zoo:fmnist_resnet10t --space family:mobilenetv3 \\
        --max_params 2M --budget 20 --seed 0 --out best.yaml
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..checkpoints import atomic_write, check_writable
from ..data.by_name import datamodule_by_name, dataset_name
from ..errors import CheckpointError, ConfigError, VisdistillError
from ..export_config import read_export_config
from ..formatting import format_count
from ..models import Backbone, check_model_name
from .evolution import CandidateError, SearchResult, search
from .scores import COMPONENTS, DisWOTScorer
from .spaces import Candidate, Constraints, measure_cost, parse_count, parse_space

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
TEACHER_INITS = ("random", "trained")


# ---------------------------------------------------------------------------- the teacher
def build_teacher(
    spec: str, num_classes: int, checkpoint: str | None = None
) -> tuple[Backbone, dict[str, Any], bool]:
    """The teacher named by ``spec`` and how a fit config names it.

    ``spec`` is a timm name (weights from ``checkpoint`` if given), ``zoo:<name>`` (its
    verified weights), or a folder / weights file written by ``visdistill export`` (the
    ``config.json`` beside it names the architecture). Returns ``(backbone,
    fit_config_entry, has_trained_weights)``.
    """
    path = Path(spec)
    if spec.startswith("zoo:"):
        from .. import zoo

        entry = zoo.get_entry(spec)  # unknown names: close matches
        kwargs: dict[str, Any] = {"name": spec}
        if entry.num_classes != num_classes:
            kwargs["num_classes"] = num_classes
        return Backbone(**kwargs), kwargs, True
    if _looks_like_path(spec):
        if checkpoint is not None:
            raise ConfigError("--teacher_checkpoint goes with a timm name, not a teacher path")
        return _teacher_from_path(path, num_classes)
    check_model_name(spec)  # unknown names: close matches
    kwargs = {"name": spec, "num_classes": num_classes}
    if checkpoint is not None:
        kwargs["checkpoint"] = str(Path(checkpoint).resolve())
    return Backbone(**kwargs), kwargs, checkpoint is not None


def _looks_like_path(spec: str) -> bool:
    return Path(spec).exists() or "/" in spec or Path(spec).suffix in _WEIGHT_SUFFIXES


def _check_teacher_name(spec: str) -> None:
    """Unknown timm / zoo names fail before any data or model is loaded."""
    if spec.startswith("zoo:"):
        from .. import zoo

        zoo.get_entry(spec)
    elif not _looks_like_path(spec):
        check_model_name(spec)


def _teacher_from_path(path: Path, num_classes: int) -> tuple[Backbone, dict[str, Any], bool]:
    """A ``visdistill export`` folder (or its ``model.safetensors``), loaded by timm's own
    ``local-dir:`` reader (``config.json`` names the architecture, kwargs and input spec)."""
    if not path.exists():
        raise CheckpointError(
            f"teacher {path} not found (resolved: {path.resolve()}); give a timm name, "
            "zoo:<name>, or the folder `visdistill export` wrote"
        )
    if path.suffix == ".ckpt":
        raise ConfigError(
            f"{path} is a Lightning checkpoint; export its student first "
            f"(`visdistill export {path} --out DIR`) and pass --teacher DIR"
        )
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"{folder} lacks config.json or model.safetensors (what `visdistill export` writes), "
            "so the teacher's architecture is unknown; pass the timm name as --teacher and the "
            "weights file as --teacher_checkpoint"
        )
    if path.is_file() and path.name != "model.safetensors":
        raise ConfigError(f"pass the export folder {folder}, not {path.name}")
    exported = read_export_config(folder, "fix it, or export the teacher again") or {}
    exported_classes = exported.get("num_classes", num_classes)
    if exported_classes != num_classes:
        raise ConfigError(
            f"the teacher in {folder} predicts {exported_classes} classes, the data "
            f"{num_classes}; score on data with the teacher's classes"
        )
    entry = {"name": f"local-dir:{folder.resolve()}", "pretrained": True}
    return Backbone(**entry), entry, True


# ----------------------------------------------------------------------------- the data
def score_batch(data: str, batch_size: int, image_size: int = 32, seed: int = 0):
    """``(images, targets, num_classes)``: a seeded random batch of the training split."""
    kwargs: dict[str, Any] = dict(image_size=image_size, augment=False, seed=seed)
    if dataset_name(data) == "fashion_mnist":
        kwargs["val_split"] = 6000
    dm = datamodule_by_name(data, **kwargs)
    dm.setup("fit")
    n = len(dm.train_set)
    if n < batch_size:
        raise ConfigError(f"--batch_size {batch_size} is more than the {n} training images")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
    items = [dm.train_set[int(i)] for i in idx]
    images = torch.stack([it["image"] for it in items])
    targets = torch.stack([torch.as_tensor(it["target"]) for it in items]).long()
    return images, targets, int(dm.num_classes)


# --------------------------------------------------------------------------- fit config
def fit_config(
    best: Candidate,
    teacher_entry: dict[str, Any],
    data: str,
    num_classes: int,
    epochs: int = 8,
    seed: int = 0,
    image_size: int = 32,
) -> dict[str, Any]:
    """A ``visdistill fit`` config in ``configs/quickstart.yaml``'s layout: the searched
    student, the given teacher, Hinton KD (T = 4), AdamW + cosine, test after fit."""
    student: dict[str, Any] = {"name": best.arch, "num_classes": num_classes}
    if best.model_kwargs:
        student["model_kwargs"] = best.model_kwargs
    if dataset_name(data) == "fashion_mnist":
        datamodule = {
            "class_path": "visdistill.FashionMNISTDataModule",
            "init_args": {
                "batch_size": 128,
                "val_split": 6000,
                "train_subset": 20000,
                "augment": True,
            },
        }
    elif dataset_name(data) == "digits":
        datamodule = {
            "class_path": "visdistill.DigitsDataModule",
            "init_args": {"batch_size": 64, "val_split": 0.1, "augment": True},
        }
    else:
        datamodule = {
            "class_path": "visdistill.ImageFolderDataModule",
            "init_args": {"train_dir": str(Path(data).resolve()), "batch_size": 128},
        }
    if image_size != 32:
        datamodule["init_args"]["image_size"] = image_size
    name = "diswot_" + best.arch
    return {
        "seed_everything": seed,
        "trainer": {
            "max_epochs": epochs,
            "accelerator": "auto",
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": name, "version": ""},
            },
        },
        "model": {
            "student": student,
            "teachers": [teacher_entry],
            "terms": [
                {"class_path": "visdistill.KD", "init_args": {"temperature": 4.0, "weight": 1.0}}
            ],
            "ce_weight": 1.0,
            "optimizer": {
                "class_path": "torch.optim.AdamW",
                "init_args": {"lr": 0.003, "weight_decay": 0.05},
            },
            "scheduler": {
                "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "init_args": {"T_max": epochs},
            },
        },
        "data": datamodule,
        "test_after_fit": True,
    }


@contextlib.contextmanager
def candidate_errors(c: Candidate):
    """Errors from deep inside timm/torch for one candidate (say, a fixed-size ViT or MLP at
    32 px) become a :class:`CandidateError`: the search skips it with a warning."""
    try:
        yield
    except VisdistillError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CandidateError(f"cannot build or run it ({type(e).__name__}: {first})") from e


# ------------------------------------------------------------------------------ output
def print_table(result: SearchResult, top: int, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"DisWOT ranking ({result.method}, {len(result.history)} scored)")
    for col in ("rank", "student", "score", "semantic", "relation", "params", "FLOPs"):
        table.add_column(col, justify="left" if col == "student" else "right")
    latency = any(e.cost is not None and e.cost.latency_ms is not None for e in result.ranking)
    if latency:
        table.add_column("CPU ms", justify="right")

    def num(v):
        return "-" if v is None else f"{v:.4g}"

    for i, e in enumerate(result.ranking[:top], 1):
        cost = e.cost
        row = [
            str(i),
            escape(e.candidate.label),  # "resnet10t[channels=...]" is not rich markup
            f"{e.score:.4g}",
            num(e.components.get("semantic")),
            num(e.components.get("relation")),
            format_count(cost.params) if cost else "-",
            format_count(cost.flops) if cost and cost.flops is not None else "-",
        ]
        if latency:
            row.append(f"{cost.latency_ms:.1f}" if cost and cost.latency_ms is not None else "-")
        table.add_row(*row)
    console.print(table)


def run_search(
    teacher: str,
    space: str,
    teacher_checkpoint: str | None = None,
    teacher_init: Literal["random", "trained"] = "random",
    space_args: dict[str, Any] | None = None,
    max_params: str | int | None = None,
    max_flops: str | int | None = None,
    max_latency_ms: float | None = None,
    budget: int = 50,
    method: Literal["auto", "exhaustive", "evolution"] = "auto",
    seed: int = 0,
    population: int | None = None,
    sample: int = 8,
    parent_top_k: int = 5,
    crossover_prob: float = 0.5,
    data: str = "fashion_mnist",
    batch_size: int = 64,
    image_size: int = 32,
    init: Literal["gaussian", "default"] = "gaussian",
    use: str = "semantic,relation",
    channel_adapter: Literal["pool", "none"] = "pool",
    top: int = 10,
    epochs: int = 8,
    out: str = "diswot_best.yaml",
    results: str | None = None,
    progress: bool = True,
    command_line: str | None = None,
) -> SearchResult:
    """Training-free student search (DisWOT, Dong et al., CVPR 2023): score candidate timm
    students against a teacher at random initialisation (semantic + relation similarity;
    higher = better), rank them, print the ranking and write a ``visdistill fit`` config
    for the best.

    Args:
        teacher: timm name, zoo:<name>, or a `visdistill export` folder.
        space: family:resnet | family:mobilenetv3 | comma-separated timm names and globs
            ('mobilenetv3_small_*,lcnet_0*').
        teacher_checkpoint: weights for a timm-name teacher.
        teacher_init: random (as DisWOT's search scripts: the teacher is re-initialised like
            the students) or trained (score against the teacher's trained weights, eval mode).
        space_args: keyword arguments of the family's space (on the command line: a JSON or
            YAML mapping, e.g. '{"depths": [1, 2]}').
        max_params: most parameters of a candidate, e.g. 2M, 500k.
        max_flops: most FLOPs per image at image_size, e.g. 50M.
        max_latency_ms: most milliseconds of a batch-1 CPU forward.
        budget: most candidates scored.
        method: exhaustive, evolution, or auto (exhaustive when the space has at most budget
            candidates).
        seed: seed of the score batch, the initialisations and the evolution.
        population: evolution population; default min(36, budget/2).
        sample: evolution tournament size.
        parent_top_k: the parent is drawn among the best this many of a tournament.
        crossover_prob: probability of a crossover child instead of a mutation.
        data: digits, fashion_mnist (or fashion-mnist), or an image folder.
        batch_size: images in the score batch.
        image_size: input side of the score batch.
        init: initialisation of the students (and of a random-init teacher).
        use: score components, a comma list of semantic, relation.
        channel_adapter: how stages of different widths are compared (pool or none).
        top: rows of the printed table.
        epochs: max_epochs of the written config.
        out: the fit config written for the best student.
        results: also write the full ranking here (JSON).
        progress: show a progress bar while scoring.
        command_line: the command recorded in the written config's header.
    """
    # Cheap checks first.
    uses = tuple(u.strip() for u in use.split(",") if u.strip())
    if not uses or any(u not in COMPONENTS for u in uses):
        raise ConfigError(f"--use takes a comma list of {', '.join(COMPONENTS)}; got {use!r}")
    if budget < 1:
        raise ConfigError(f"--budget must be at least 1, got {budget}")
    if batch_size < 2:
        raise ConfigError(f"--batch_size must be at least 2 (a batch relation), got {batch_size}")
    constraints = Constraints(
        max_params=parse_count(max_params),
        max_flops=parse_count(max_flops),
        max_latency_ms=max_latency_ms,
    )
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise ConfigError(f"--max_latency_ms must be positive, got {max_latency_ms}")
    _check_teacher_name(teacher)
    # Scoring can take hours: an output that cannot be written must fail now, not after it.
    out_path = check_writable(out, "--out config")
    results_path = check_writable(results, "--results file") if results else None
    candidates = parse_space(space, dict(space_args or {}))

    images, targets, num_classes = score_batch(data, batch_size, image_size, seed)
    torch.manual_seed(seed)
    teacher_model, teacher_entry, trained = build_teacher(teacher, num_classes, teacher_checkpoint)
    if teacher_init == "trained" and not trained:
        raise ConfigError(
            f"--teacher_init trained needs trained weights, but {teacher} has none; give a "
            "zoo:<name> teacher, an export folder, or --teacher_checkpoint"
        )
    scorer = DisWOTScorer(
        teacher_model,
        images,
        targets,
        use=uses,
        init=init,
        reinit_teacher=teacher_init == "random",
        seed=seed,
        channel_adapter=channel_adapter,
    )

    def score_fn(c: Candidate):
        torch.manual_seed(seed)
        with candidate_errors(c):
            return scorer(c.build(num_classes), copy_model=False)

    def cost_fn(c: Candidate, flops: bool = False, latency: bool = False):
        with candidate_errors(c):
            return measure_cost(c, num_classes, image_size, flops=flops, latency=latency)

    from rich.progress import Progress

    start = time.perf_counter()
    with Progress(disable=not progress, transient=False) as bar:
        total = min(budget, _space_size(candidates))
        task = bar.add_task("DisWOT scoring", total=total)
        result = search(
            candidates,
            score_fn,
            budget=budget,
            constraints=constraints,
            cost_fn=cost_fn,
            seed=seed,
            method=method,
            progress=lambda e: bar.update(
                task, advance=1, description=f"scored {e.candidate.label}"
            ),
            population=population,
            sample=sample,
            parent_top_k=parent_top_k,
            crossover_prob=crossover_prob,
        )
    # Costs of the rows shown (FLOPs on the meta device; cheap next to scoring).
    for e in result.ranking[:top]:
        known = e.cost
        if known is None or known.flops is None:
            e.cost = cost_fn(e.candidate, flops=True)
            if known is not None:
                e.cost.latency_ms = known.latency_ms
    print_table(result, top)
    best = result.best
    config = fit_config(best.candidate, teacher_entry, data, num_classes, epochs, seed, image_size)
    header = [
        f"DisWOT search: best of {len(result.history)} scored students ({result.method}) for "
        f"teacher {teacher}",
        f"  {command_line or 'visdistill search'}",
        f"  score {best.score:.6g} (semantic {best.components.get('semantic')}, relation "
        f"{best.components.get('relation')}); teacher at {teacher_init} init, init {init}",
        "Train it: visdistill fit --config <this file>",
    ]
    if not trained:
        header.append(
            "WARNING: this teacher has no trained weights; set model.teachers[0].checkpoint "
            "before training, or KD distils an untrained model"
        )
        print(
            "warning: the teacher has no trained weights: the written config needs a "
            "checkpoint for it before KD is meaningful"
        )
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False)
    atomic_write(out_path, lambda tmp: Path(tmp).write_text(text))
    print(f"best student: {best.candidate.label} (score {best.score:.6g})")
    print(f"wrote {out_path}: visdistill fit --config {out_path}")
    if results_path is not None:
        payload = {
            "teacher": teacher,
            "teacher_init": teacher_init,
            "init": init,
            "use": list(uses),
            "seed": seed,
            "batch_size": batch_size,
            "data": data,
            "constraints": {
                "max_params": constraints.max_params,
                "max_flops": constraints.max_flops,
                "max_latency_ms": constraints.max_latency_ms,
            },
            "wall_seconds": time.perf_counter() - start,
            **result.as_dict(),
        }
        results_text = json.dumps(payload, indent=2)
        atomic_write(results_path, lambda tmp: Path(tmp).write_text(results_text))
        print(f"wrote {results_path}")
    return result


def _space_size(space) -> int:
    try:
        return len(space)
    except NotImplementedError:
        return 10**9
