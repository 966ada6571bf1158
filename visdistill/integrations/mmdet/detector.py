"""``DistillingDetector``: a frozen mmdet teacher detector distilled into a student detector.

Configured like any mmdet model (``model = dict(type="DistillingDetector", ...)`` with
``custom_imports = dict(imports=["visdistill.integrations.mmdet"])``); trained, validated and
tested by mmengine's Runner. Validation and test run the student alone, so ``CocoMetric`` reports the
student's mAP.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from mmdet.models.detectors import BaseDetector, SingleStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.registry import MODELS
from mmengine.config import Config, ConfigDict
from torch import Tensor, nn

from ...errors import ConfigError
from .checkpoints import load_detector_weights
from .losses import DenseLogitKDLoss, FeatureDistillLoss


def _as_cfg(cfg) -> ConfigDict | None:
    # ConfigDict, not dict: mmdet heads read their train_cfg / test_cfg as attributes
    return ConfigDict(copy.deepcopy(cfg)) if cfg is not None else None


def model_config(spec: dict | str, role: str) -> ConfigDict:
    """A detector's model config: the dict itself, or the ``model`` of an mmdet config file."""
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{role} config file not found: {spec} (resolved: {path.resolve()})")
        cfg = Config.fromfile(str(path))
        if "model" not in cfg:
            raise ConfigError(f"{role} config {spec} has no `model`")
        return _as_cfg(cfg.model)
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(
            f"{role} must be an mmdet model config (a dict with `type`) or a config file path"
        )
    return _as_cfg(spec)


@MODELS.register_module()
class DistillingDetector(BaseDetector):
    """Student detector trained with its own losses plus distillation from a frozen teacher.

    Per step the teacher (eval mode, ``no_grad``) runs on the same preprocessed batch; the student's
    detection losses are computed as mmdet does, and each distillation loss is added under its own
    key (``loss_distill_<name>``), which mmengine sums into the total and logs.

    Args:
        student: the student's mmdet model config (any detector with ``extract_feat``; logit KD needs
            a single-stage dense head), or the path of a config file whose ``model`` it is.
        teacher: the teacher's mmdet model config, or a config file path.
        teacher_checkpoint: the teacher's weights: ``.safetensors`` or a torch state dict (read
            weights-only); a Runner checkpoint needs ``teacher_trusted=True`` or a conversion
            (``python -m visdistill.integrations.mmdet convert``).
        teacher_trusted: unpickle the teacher checkpoint without ``weights_only`` (trusted files only).
        feature_losses: configs of neck-feature terms (``NDFeatureLoss``, ``FitNetFeatureLoss``,
            ``ChannelWiseFeatureLoss``), each with its ``weight`` and ``levels``.
        logit_loss: config of ``DenseLogitKDLoss`` (``None``: no logit KD).
        probe_size: side of the blank image used once at construction to measure each neck level's
            channels (projectors are built before the optimizer exists).
        data_preprocessor: defaults to the student's; the teacher's must normalise the same way.
    """

    def __init__(
        self,
        student: dict | str,
        teacher: dict | str,
        teacher_checkpoint: str | None = None,
        teacher_trusted: bool = False,
        feature_losses: Sequence[dict] = (),
        logit_loss: dict | None = None,
        probe_size: int = 128,
        data_preprocessor: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        student, teacher = model_config(student, "student"), model_config(teacher, "teacher")
        if data_preprocessor is None:
            data_preprocessor = student.get("data_preprocessor")
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.student = MODELS.build(student)
        self.teacher = MODELS.build(teacher)
        self._check_preprocessors(teacher.get("data_preprocessor"))
        self.teacher_checkpoint, self.teacher_trusted = teacher_checkpoint, teacher_trusted
        if teacher_checkpoint is None:
            warnings.warn(
                "DistillingDetector: no teacher_checkpoint, the teacher keeps its initial weights "
                "(fine only when a whole distiller checkpoint is loaded next, e.g. load_from)",
                stacklevel=2,
            )
        else:
            load_detector_weights(self.teacher, teacher_checkpoint, trusted=teacher_trusted)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        self.feature_losses = nn.ModuleList(MODELS.build(_as_cfg(c)) for c in feature_losses)
        for loss in self.feature_losses:
            if not isinstance(loss, FeatureDistillLoss):
                raise ConfigError(
                    f"feature_losses takes NDFeatureLoss, FitNetFeatureLoss or ChannelWiseFeatureLoss, "
                    f"got {type(loss).__name__}"
                )
        self.logit_loss = MODELS.build(_as_cfg(logit_loss)) if logit_loss is not None else None
        if self.logit_loss is not None:
            if not isinstance(self.logit_loss, DenseLogitKDLoss):
                raise ConfigError(
                    f"logit_loss takes DenseLogitKDLoss, got {type(self.logit_loss).__name__}"
                )
            for role, model in (("student", self.student), ("teacher", self.teacher)):
                if not isinstance(model, SingleStageDetector):
                    raise ConfigError(
                        f"logit_loss needs single-stage dense heads (RetinaNet, FCOS, ATSS, ...); the "
                        f"{role} is a {type(model).__name__}, whose class logits depend on its own "
                        "proposals. Use feature_losses only, or a single-stage pair"
                    )
            self.logit_loss.setup(self.student.bbox_head)
        if self.feature_losses:
            s_channels, t_channels = self._probe_channels(probe_size)
            for loss in self.feature_losses:
                loss.setup(s_channels, t_channels)

    # -- construction helpers -------------------------------------------------------------------
    def _check_preprocessors(self, teacher_cfg: dict | None) -> None:
        if teacher_cfg is None:
            return
        theirs = MODELS.build(copy.deepcopy(teacher_cfg))
        ours = self.data_preprocessor
        for attr in ("mean", "std"):
            a, b = getattr(ours, attr, None), getattr(theirs, attr, None)
            if (a is None) != (b is None) or (a is not None and not torch.allclose(a, b)):
                raise ConfigError(
                    f"the teacher's data_preprocessor {attr} ({None if b is None else b.flatten().tolist()}) "
                    f"differs from the student's ({None if a is None else a.flatten().tolist()}); the "
                    "teacher sees the student's preprocessed batch, so give both the same normalisation"
                )
        if getattr(ours, "_channel_conversion", None) != getattr(
            theirs, "_channel_conversion", None
        ):
            raise ConfigError(
                "the teacher's data_preprocessor bgr_to_rgb differs from the student's; use the same"
            )

    @torch.no_grad()
    def _probe_channels(self, size: int) -> tuple[list[int], list[int]]:
        x = torch.zeros(1, 3, size, size)
        was_training = self.student.training
        self.student.eval()  # no BatchNorm statistics from a blank image
        try:
            s = self.student.extract_feat(x)
            t = self.teacher.extract_feat(x)
        finally:
            self.student.train(was_training)
        return [f.shape[1] for f in s], [f.shape[1] for f in t]

    # -- mmengine hooks ---------------------------------------------------------------------------
    def init_weights(self) -> None:
        # mmengine's default would re-initialise the teacher, whose weights were loaded at construction.
        self.student.init_weights()

    def train(self, mode: bool = True) -> DistillingDetector:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm and dropout stay in inference behaviour
        return self

    # -- forward modes ----------------------------------------------------------------------------
    def extract_feat(self, batch_inputs: Tensor):
        return self.student.extract_feat(batch_inputs)

    def _forward(self, batch_inputs: Tensor, batch_data_samples=None):
        return self.student._forward(batch_inputs, batch_data_samples)

    def predict(self, batch_inputs: Tensor, batch_data_samples, rescale: bool = True):
        return self.student.predict(batch_inputs, batch_data_samples, rescale=rescale)

    def loss(self, batch_inputs: Tensor, batch_data_samples) -> dict:
        with torch.no_grad():
            t_feats = self.teacher.extract_feat(batch_inputs) if self._wants_teacher_feats else None
            t_scores = self.teacher.bbox_head(t_feats)[0] if self.logit_loss is not None else None
        if isinstance(self.student, SingleStageDetector):
            # SingleStageDetector.loss, unrolled to keep the features and class scores it computes.
            s_feats = self.student.extract_feat(batch_inputs)
            outs = self.student.bbox_head(s_feats)
            gt_instances, gt_ignore, img_metas = unpack_gt_instances(batch_data_samples)
            losses = self.student.bbox_head.loss_by_feat(*outs, gt_instances, img_metas, gt_ignore)
            s_scores = outs[0]
        else:
            s_feats, losses = self._loss_keeping_features(batch_inputs, batch_data_samples)
            s_scores = None
        for term in self.feature_losses:
            losses[f"loss_distill_{term.name}"] = term(s_feats, t_feats)
        if self.logit_loss is not None:
            losses[f"loss_distill_{self.logit_loss.name}"] = self.logit_loss(s_scores, t_scores)
        return losses

    @property
    def _wants_teacher_feats(self) -> bool:
        return bool(self.feature_losses) or self.logit_loss is not None

    def _loss_keeping_features(self, batch_inputs: Tensor, batch_data_samples):
        """The student's own ``loss`` (two-stage or any detector), with the neck features it
        extracts kept for the feature terms: ``extract_feat`` is wrapped for this one call."""
        kept: list = []
        extract = self.student.extract_feat

        def extract_and_keep(x: Tensor):
            feats = extract(x)
            kept.append(feats)
            return feats

        self.student.extract_feat = extract_and_keep
        try:
            losses = self.student.loss(batch_inputs, batch_data_samples)
        finally:
            del self.student.extract_feat
        if len(kept) != 1:
            raise RuntimeError(
                f"{type(self.student).__name__}.loss called extract_feat {len(kept)} times; "
                "DistillingDetector expects exactly one"
            )
        return kept[0], losses
