"""``visdistill search``: rank timm students for a teacher with DisWOT, write a fit config.

    visdistill search --teacher zoo:fmnist_resnet10t --space family:mobilenetv3 \\
        --max-params 2M --budget 20 --seed 0 --out best.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoints import atomic_write, check_writable
from ..errors import CheckpointError, ConfigError, VisdistillError
from ..formatting import format_count
from ..models import Backbone, check_model_name
from .evolution import CandidateError, SearchResult, search
from .scores import COMPONENTS, INITS, DisWOTScorer
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
            raise ConfigError("--teacher-checkpoint goes with a timm name, not a teacher path")
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
            "weights file as --teacher-checkpoint"
        )
    if path.is_file() and path.name != "model.safetensors":
        raise ConfigError(f"pass the export folder {folder}, not {path.name}")
    try:
        exported = json.loads((folder / "config.json").read_text())
        exported_classes = int(exported.get("num_classes", num_classes))
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{folder / 'config.json'} is not a timm config: {e}") from e
    if exported_classes != num_classes:
        raise ConfigError(
            f"the teacher in {folder} predicts {exported_classes} classes, the data "
            f"{num_classes}; score on data with the teacher's classes"
        )
    entry = {"name": f"local-dir:{folder.resolve()}", "pretrained": True}
    return Backbone(**entry), entry, True


# ----------------------------------------------------------------------------- the data
def _datamodule(data: str, image_size: int, seed: int):
    from ..data import DigitsDataModule, FashionMNISTDataModule, ImageFolderDataModule

    common = dict(image_size=image_size, augment=False, seed=seed)
    if data == "digits":
        return DigitsDataModule(**common)
    if data == "fashion-mnist":
        return FashionMNISTDataModule(val_split=6000, **common)
    if Path(data).is_dir():
        return ImageFolderDataModule(train_dir=data, **common)
    raise ConfigError(
        f"--data must be 'digits', 'fashion-mnist' or an image folder; {data!r} is none "
        f"(no directory at {Path(data).resolve()})"
    )


def score_batch(data: str, batch_size: int, image_size: int = 32, seed: int = 0):
    """``(images, targets, num_classes)``: a seeded random batch of the training split."""
    dm = _datamodule(data, image_size, seed)
    dm.setup("fit")
    n = len(dm.train_set)
    if n < batch_size:
        raise ConfigError(f"--batch-size {batch_size} is more than the {n} training images")
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
    if data == "fashion-mnist":
        datamodule = {
            "class_path": "visdistill.FashionMNISTDataModule",
            "init_args": {
                "batch_size": 128,
                "val_split": 6000,
                "train_subset": 20000,
                "augment": True,
            },
        }
    elif data == "digits":
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


def search_main(args: list[str]) -> SearchResult:
    parser = argparse.ArgumentParser(
        prog="visdistill search",
        description="Training-free student search (DisWOT, CVPR 2023): score candidate timm "
        "students against a teacher at random initialisation (semantic + relation "
        "similarity; higher = better), rank them, and write a `visdistill fit` config for "
        "the best.",
    )
    parser.add_argument(
        "--teacher", required=True, help="timm name, zoo:<name>, or a `visdistill export` folder"
    )
    parser.add_argument(
        "--teacher-checkpoint", default=None, help="weights for a timm-name teacher"
    )
    parser.add_argument(
        "--teacher-init",
        choices=TEACHER_INITS,
        default="random",
        help="random (default, as DisWOT's search scripts: the teacher is re-initialised like "
        "the students) or trained (score against the teacher's trained weights, eval mode)",
    )
    parser.add_argument(
        "--space",
        required=True,
        help="family:resnet | family:mobilenetv3 | comma-separated timm names and globs "
        "('mobilenetv3_small_*,lcnet_0*')",
    )
    parser.add_argument("--space-args", default="{}", help="JSON kwargs of the family's space")
    parser.add_argument("--max-params", default=None, help="e.g. 2M, 500k")
    parser.add_argument("--max-flops", default=None, help="per image at --image-size, e.g. 50M")
    parser.add_argument("--max-latency-ms", type=float, default=None, help="batch-1 CPU forward")
    parser.add_argument("--budget", type=int, default=50, help="most candidates scored")
    parser.add_argument("--method", choices=("auto", "exhaustive", "evolution"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", type=int, default=None, help="default min(36, budget/2)")
    parser.add_argument("--sample", type=int, default=8, help="tournament size")
    parser.add_argument("--parent-top-k", type=int, default=5)
    parser.add_argument("--crossover-prob", type=float, default=0.5)
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist | digits | folder")
    parser.add_argument("--batch-size", type=int, default=64, help="images in the score batch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--init", choices=INITS, default="gaussian")
    parser.add_argument("--use", default="semantic,relation", help="score components")
    parser.add_argument("--channel-adapter", choices=("pool", "none"), default="pool")
    parser.add_argument("--top", type=int, default=10, help="rows of the printed table")
    parser.add_argument("--epochs", type=int, default=8, help="max_epochs of the written config")
    parser.add_argument("--out", default="diswot_best.yaml", help="fit config for the best")
    parser.add_argument("--results", default=None, help="also write the full ranking (JSON)")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(args)

    # Cheap checks first.
    use = tuple(u.strip() for u in ns.use.split(",") if u.strip())
    if not use or any(u not in COMPONENTS for u in use):
        raise ConfigError(f"--use takes a comma list of {', '.join(COMPONENTS)}; got {ns.use!r}")
    if ns.budget < 1:
        raise ConfigError(f"--budget must be at least 1, got {ns.budget}")
    if ns.batch_size < 2:
        raise ConfigError(
            f"--batch-size must be at least 2 (a batch relation), got {ns.batch_size}"
        )
    try:
        space_args = json.loads(ns.space_args)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--space-args is not valid JSON: {e}") from e
    constraints = Constraints(
        max_params=parse_count(ns.max_params),
        max_flops=parse_count(ns.max_flops),
        max_latency_ms=ns.max_latency_ms,
    )
    if ns.max_latency_ms is not None and ns.max_latency_ms <= 0:
        raise ConfigError(f"--max-latency-ms must be positive, got {ns.max_latency_ms}")
    _check_teacher_name(ns.teacher)
    # Scoring can take hours: an output that cannot be written must fail now, not after it.
    out = check_writable(ns.out, "--out config")
    results_path = check_writable(ns.results, "--results file") if ns.results else None
    space = parse_space(ns.space, space_args)

    images, targets, num_classes = score_batch(ns.data, ns.batch_size, ns.image_size, ns.seed)
    torch.manual_seed(ns.seed)
    teacher, teacher_entry, trained = build_teacher(ns.teacher, num_classes, ns.teacher_checkpoint)
    if ns.teacher_init == "trained" and not trained:
        raise ConfigError(
            f"--teacher-init trained needs trained weights, but {ns.teacher} has none; give a "
            "zoo:<name> teacher, an export folder, or --teacher-checkpoint"
        )
    scorer = DisWOTScorer(
        teacher,
        images,
        targets,
        use=use,
        init=ns.init,
        reinit_teacher=ns.teacher_init == "random",
        seed=ns.seed,
        channel_adapter=ns.channel_adapter,
    )

    def score_fn(c: Candidate):
        torch.manual_seed(ns.seed)
        with candidate_errors(c):
            return scorer(c.build(num_classes), copy_model=False)

    def cost_fn(c: Candidate, flops: bool = False, latency: bool = False):
        with candidate_errors(c):
            return measure_cost(c, num_classes, ns.image_size, flops=flops, latency=latency)

    from rich.progress import Progress

    start = time.perf_counter()
    with Progress(disable=ns.no_progress, transient=False) as bar:
        total = min(ns.budget, _space_size(space))
        task = bar.add_task("DisWOT scoring", total=total)
        result = search(
            space,
            score_fn,
            budget=ns.budget,
            constraints=constraints,
            cost_fn=cost_fn,
            seed=ns.seed,
            method=ns.method,
            progress=lambda e: bar.update(
                task, advance=1, description=f"scored {e.candidate.label}"
            ),
            population=ns.population,
            sample=ns.sample,
            parent_top_k=ns.parent_top_k,
            crossover_prob=ns.crossover_prob,
        )
    # Costs of the rows shown (FLOPs on the meta device; cheap next to scoring).
    for e in result.ranking[: ns.top]:
        known = e.cost
        if known is None or known.flops is None:
            e.cost = cost_fn(e.candidate, flops=True)
            if known is not None:
                e.cost.latency_ms = known.latency_ms
    print_table(result, ns.top)
    best = result.best
    config = fit_config(
        best.candidate, teacher_entry, ns.data, num_classes, ns.epochs, ns.seed, ns.image_size
    )
    header = [
        f"DisWOT search: best of {len(result.history)} scored students ({result.method}) for "
        f"teacher {ns.teacher}",
        f"  visdistill search {' '.join(args)}",
        f"  score {best.score:.6g} (semantic {best.components.get('semantic')}, relation "
        f"{best.components.get('relation')}); teacher at {ns.teacher_init} init, init {ns.init}",
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
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(f"best student: {best.candidate.label} (score {best.score:.6g})")
    print(f"wrote {out}: visdistill fit --config {out}")
    if results_path is not None:
        payload = {
            "teacher": ns.teacher,
            "teacher_init": ns.teacher_init,
            "init": ns.init,
            "use": list(use),
            "seed": ns.seed,
            "batch_size": ns.batch_size,
            "data": ns.data,
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
