"""CKA heat maps between the stages of two models over a data loader."""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.progress import track
from torch import Tensor
from torch.utils.data import DataLoader

from ..checkpoints import atomic_write
from ..errors import ConfigError
from ..models import Backbone
from .accumulator import MinibatchCKA, NoCKABatchesError, no_update_warning

MATRIX_SUFFIXES = (".csv", ".json")


def stage_names(model: Backbone, stages: Sequence[int]) -> list[str]:
    """``"<index>:<timm module>"`` labels for the heat map axes."""
    return [f"{s}:{model.feature_info[s]['module']}" for s in stages]


@torch.no_grad()
def cka_matrix(
    model_a: Backbone,
    model_b: Backbone,
    loader: DataLoader,
    stages_a: Sequence[int] | None = None,
    stages_b: Sequence[int] | None = None,
    epochs: int = 1,
    progress: bool = True,
    max_batches: int | None = None,
) -> tuple[Tensor, list[str], list[str]]:
    """Minibatch linear CKA between every stage pair, ``(P, Q)`` float64.

    Stage maps ``(B, C, h, w)`` (ViT tokens as their grid) are flattened to ``(B, C*h*w)``:
    flattened, not pooled, CKA. Both models see the same canonical batch and
    preprocess it themselves. Batches of 3 or fewer examples (a short last batch) are
    skipped with a warning: HSIC_1 is undefined for them. ``max_batches`` caps the batches
    per epoch.
    """
    stages_a = list(range(len(model_a.feature_info))) if stages_a is None else list(stages_a)
    stages_b = list(range(len(model_b.feature_info))) if stages_b is None else list(stages_b)
    model_a.check_stages(stages_a)
    model_b.check_stages(stages_b)
    modes = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    device = next(model_a.parameters()).device
    acc = MinibatchCKA(len(stages_a), len(stages_b)).to(device)
    per_epoch = len(loader) if max_batches is None else min(max_batches, len(loader))
    skipped: list[int] = []
    try:
        batches = (b for _ in range(epochs) for b in itertools.islice(loader, per_epoch))
        if progress:
            batches = track(batches, total=epochs * per_epoch, description="CKA")
        for batch in batches:
            images = (batch["image"] if isinstance(batch, dict) else batch[0]).to(device)
            if len(images) <= 3:
                skipped.append(len(images))
                continue
            out_a = model_a(images, stages=stages_a)
            out_b = model_b(images, stages=stages_b)
            acc.update([out_a.stages[s] for s in stages_a], [out_b.stages[s] for s in stages_b])
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if skipped:
        warnings.warn(
            f"CKA skipped {len(skipped)} batch(es) of fewer than 4 examples (sizes "
            f"{sorted(set(skipped))}): the unbiased HSIC_1 needs 4 per batch. "
            "Use drop_last=True or a sample count that is a multiple of the batch size.",
            stacklevel=2,
        )
    # compute() sums the states over ranks before it checks for "no batches", so under DDP a
    # rank that got no batch cannot leave the others waiting.
    try:
        with no_update_warning():
            # torchmetrics returns a 1 x 1 result as a 0-d tensor; the heat map wants (P, Q).
            matrix = acc.compute().cpu().reshape(len(stages_a), len(stages_b))
    except NoCKABatchesError as e:
        raise NoCKABatchesError(f"{e} (the loader yielded no usable batch)") from None
    return matrix, stage_names(model_a, stages_a), stage_names(model_b, stages_b)


def plot_cka(
    matrix: Tensor,
    names_a: Sequence[str],
    names_b: Sequence[str],
    path: str | Path,
    title: str = "",
):
    """Heat map PNG: model A's stages on the y axis (origin lower), B's on the x axis.

    Uses a bare ``Figure`` with the Agg canvas: no pyplot state, no backend switch for the
    caller's process.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.9 * len(names_b), 1.0 + 0.7 * len(names_a)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix.numpy(), origin="lower", vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(names_b)), names_b, rotation=45, ha="right")
    ax.set_yticks(range(len(names_a)), names_a)
    for (i, j), v in zip(
        torch.cartesian_prod(torch.arange(len(names_a)), torch.arange(len(names_b))).tolist(),
        matrix.flatten().tolist(),
        strict=True,
    ):
        ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            color="white" if v < 0.6 else "black",
            fontsize=8,
        )
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def save_cka(
    matrix: Tensor, names_a: Sequence[str], names_b: Sequence[str], path: str | Path
) -> None:
    """The matrix as JSON (``{"rows", "cols", "cka"}``) or CSV, chosen by the extension
    (``.json`` / ``.csv``, any case); any other extension is a :class:`ConfigError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MATRIX_SUFFIXES:
        raise ConfigError(
            f"cannot write a CKA matrix as {path.suffix or 'a file without suffix'!r} ({path}); "
            f"use one of {', '.join(MATRIX_SUFFIXES)}"
        )
    if suffix == ".csv":
        lines = [",".join(["", *names_b])]
        lines += [
            ",".join([a, *(f"{v:.6f}" for v in row)])
            for a, row in zip(names_a, matrix.tolist(), strict=True)
        ]
        text = "\n".join(lines) + "\n"
    else:
        text = json.dumps(
            {"rows": list(names_a), "cols": list(names_b), "cka": matrix.tolist()}, indent=2
        )
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
