"""Measuring a zoo model's test top-1 again (``visdistill zoo evaluate``).

Apart from :mod:`visdistill.zoo` because it needs :class:`~visdistill.models.Backbone`,
which itself builds ``zoo:`` models: the zoo module stays free of the models module.
"""

from __future__ import annotations

from . import zoo
from .data.by_name import NAMED_DATASETS, datamodule_by_name, dataset_name
from .errors import DataNotFoundError
from .fast_path import use_channels_last
from .loader_pass import run_over_loader
from .models import Backbone


def evaluate_zoo_model(
    name: str,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    channels_last: bool = True,
) -> float:
    """Top-1 accuracy (%) of the zoo model ``name`` on its data set's test split.

    Only data sets available offline are supported (``fashion_mnist``, ``digits``); ``limit``
    evaluates the first ``limit`` test images only. ``channels_last`` runs the model in that
    memory format (faster on CPU and CUDA; results differ from the default format by float
    rounding only).
    """
    entry = zoo.get_entry(name)
    if entry.dataset is None or dataset_name(entry.dataset) not in NAMED_DATASETS:
        raise DataNotFoundError(
            f"zoo entry {entry.name} was measured on {entry.dataset!r}, which visdistill cannot "
            f"load offline (supported: {list(NAMED_DATASETS)}); evaluate it with "
            "`visdistill test` and a data module for your copy of the data"
        )
    side = entry.input.get("size") or 32
    dm = datamodule_by_name(
        entry.dataset, batch_size=batch_size, image_size=side, test_subset=limit
    )
    dm.setup("test")
    model = Backbone(zoo.PREFIX + entry.name)
    use_channels_last(model, next(model.parameters()).device, channels_last)
    correct = total = 0
    for batch, out in run_over_loader(
        model, dm.test_dataloader(), desc=entry.name, progress=progress
    ):
        pred = out.logits.argmax(-1)
        correct += int((pred == batch["target"]).sum())
        total += len(pred)
    return 100.0 * correct / total
