"""Detection distillation inside mmdet 3.x configs.

Importing this package registers, in mmdet's ``MODELS`` registry: ``DistillingDetector`` and the
losses ``NDFeatureLoss``, ``FitNetFeatureLoss``, ``ChannelWiseFeatureLoss``, ``DenseLogitKDLoss``.
A config pulls it in with::

    custom_imports = dict(imports=["visdistill.integrations.mmdet"], allow_failed_imports=False)

Needs the ``mmdet`` extra (mmengine 0.10.7, mmcv 2.1.0 with its compiled ops, mmdet 3.3.0):
``bash scripts/install_mmdet.sh``. The rest of visdistill never imports this package.
"""

from __future__ import annotations

try:
    import mmcv.ops  # noqa: F401  (mmcv-lite lacks the compiled ops every detector needs)
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only where the extra is missing
    raise ImportError(
        f"visdistill.integrations.mmdet needs mmengine, mmcv (with ops) and mmdet ({e}). Install "
        "them with `bash scripts/install_mmdet.sh` (builds mmcv's wheel once and caches it)."
    ) from e

from .checkpoints import convert_checkpoint, load_detector_weights, read_state_dict
from .detector import DistillingDetector
from .losses import (
    ChannelWiseFeatureLoss,
    DenseLogitKDLoss,
    FeatureDistillLoss,
    FitNetFeatureLoss,
    NDFeatureLoss,
)

__all__ = [
    "ChannelWiseFeatureLoss",
    "DenseLogitKDLoss",
    "DistillingDetector",
    "FeatureDistillLoss",
    "FitNetFeatureLoss",
    "NDFeatureLoss",
    "convert_checkpoint",
    "load_detector_weights",
    "read_state_dict",
]
