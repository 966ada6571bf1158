"""Distillation losses as mmdet modules: feature terms on neck (FPN) levels and dense-head logit KD.

Each is an ``nn.Module`` registered in mmdet's ``MODELS``, configured by ``type=`` inside a
:class:`~visdistill.integrations.mmdet.DistillingDetector`. The math is visdistill's pure functions
(:mod:`visdistill.losses.detection`); these modules add the per-level projectors, level selection and
loss weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmdet.registry import MODELS
from torch import Tensor, nn

from ...errors import ConfigError
from ...losses.detection import (
    anchor_logits,
    binary_kd_loss,
    channel_wise_loss,
    fitnet_loss,
    nd_feature_loss,
    softmax_kd_loss,
)


class FeatureDistillLoss(nn.Module):
    """Base of the neck-feature terms: ``weight * mean over levels of loss(proj_l(s_l), t_l)``.

    Args:
        weight: loss weight.
        levels: indices of the neck outputs to distill (``None``: all of them).
        projector: ``True``: a 1x1 conv per level from the student's to the teacher's channels;
            ``False``: none (channels must match); ``None``: only where the channels differ.
    """

    name = "feature"
    default_projector: bool | None = None

    def __init__(
        self,
        weight: float = 1.0,
        levels: Sequence[int] | None = None,
        projector: bool | None = None,
    ) -> None:
        super().__init__()
        self.weight = float(weight)
        self.levels = None if levels is None else tuple(int(i) for i in levels)
        self.projector = self.default_projector if projector is None else bool(projector)
        self.projectors = nn.ModuleList()
        self.selected: tuple[int, ...] = ()

    def setup(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        """Build the projectors from each level's ``(student, teacher)`` channels (measured by the
        distiller with one forward pass before training)."""
        if len(student_channels) != len(teacher_channels):
            raise ConfigError(
                f"{type(self).__name__}: the student's neck gives {len(student_channels)} levels and "
                f"the teacher's {len(teacher_channels)}; give both necks the same num_outs or choose "
                "common levels with `levels=`"
            )
        n = len(student_channels)
        self.selected = tuple(range(n)) if self.levels is None else self.levels
        bad = [i for i in self.selected if not -n <= i < n]
        if bad:
            raise ConfigError(
                f"{type(self).__name__}: levels {bad} out of range for a {n}-level neck"
            )
        for i in self.selected:
            c_s, c_t = student_channels[i], teacher_channels[i]
            if self.projector or (self.projector is None and c_s != c_t):
                self.projectors.append(nn.Conv2d(c_s, c_t, kernel_size=1))
            elif c_s != c_t:
                raise ConfigError(
                    f"{type(self).__name__}: level {i} has {c_s} student and {c_t} teacher channels "
                    "and projector=False; set projector=True (a 1x1 conv) or match the necks' out_channels"
                )
            else:
                self.projectors.append(nn.Identity())

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        if not self.selected:
            raise RuntimeError(f"{type(self).__name__}.setup() was not called")
        total = 0.0
        for proj, i in zip(self.projectors, self.selected, strict=True):
            s, t = proj(student_feats[i]), teacher_feats[i]
            if s.shape[-2:] != t.shape[-2:]:
                raise ConfigError(
                    f"{type(self).__name__}: level {i} is {tuple(s.shape[-2:])} in the student and "
                    f"{tuple(t.shape[-2:])} in the teacher; the necks need the same strides"
                )
            total = total + self.loss(s, t)
        return self.weight * total / len(self.selected)


@MODELS.register_module()
class NDFeatureLoss(FeatureDistillLoss):
    """ND-style norm and direction loss at every position of each level
    (:func:`~visdistill.losses.detection.nd_feature_loss`)."""

    name = "nd"

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return nd_feature_loss(student, teacher)


@MODELS.register_module()
class FitNetFeatureLoss(FeatureDistillLoss):
    """FitNets hint loss: MSE between the projected student map and the teacher's; the 1x1-conv
    regressor is always built (``projector=True`` by default)."""

    name = "fitnet"
    default_projector = True

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return fitnet_loss(student, teacher)


@MODELS.register_module()
class ChannelWiseFeatureLoss(FeatureDistillLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021): per channel, a softmax over positions at
    temperature ``T`` and the teacher-to-student KL (:func:`~visdistill.losses.detection.channel_wise_loss`).

    Args:
        temperature: ``T`` (the paper uses 4 for detection).
    """

    name = "cwd"

    def __init__(self, temperature: float = 4.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ConfigError(f"ChannelWiseFeatureLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return channel_wise_loss(student, teacher, self.temperature)


@MODELS.register_module()
class DenseLogitKDLoss(nn.Module):
    """KD on a dense head's classification logits at every anchor of every level.

    Student and teacher heads must share anchors (generator, levels) and classes.

    Args:
        weight: loss weight.
        temperature: ``T``.
        mode: ``"sigmoid"`` (binary KL per class: RetinaNet, FCOS, ATSS), ``"softmax"`` (Hinton KD
            over the head's outputs, for ``use_sigmoid=False`` heads) or ``"auto"`` (from the student
            head's ``use_sigmoid_cls``).
    """

    name = "kd"

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, mode: str = "auto") -> None:
        super().__init__()
        if mode not in ("auto", "sigmoid", "softmax"):
            raise ConfigError(
                f"DenseLogitKDLoss: mode must be auto, sigmoid or softmax, got {mode!r}"
            )
        if temperature <= 0:
            raise ConfigError(f"DenseLogitKDLoss: temperature must be > 0, got {temperature}")
        self.weight, self.temperature, self.mode = float(weight), float(temperature), mode
        self.num_outputs = 0

    def setup(self, head: nn.Module) -> None:
        """Read the class-output width (and sigmoid/softmax) from the student's dense head."""
        self.num_outputs = int(head.cls_out_channels)
        if self.mode == "auto":
            self.mode = "sigmoid" if getattr(head, "use_sigmoid_cls", True) else "softmax"

    def forward(self, student_scores: Sequence[Tensor], teacher_scores: Sequence[Tensor]) -> Tensor:
        if len(student_scores) != len(teacher_scores):
            raise ConfigError(
                f"DenseLogitKDLoss: the student head has {len(student_scores)} levels and the "
                f"teacher's {len(teacher_scores)}"
            )
        fn = binary_kd_loss if self.mode == "sigmoid" else softmax_kd_loss
        s_rows, t_rows = [], []
        for i, (s, t) in enumerate(zip(student_scores, teacher_scores, strict=True)):
            if s.shape != t.shape:
                raise ConfigError(
                    f"DenseLogitKDLoss: level {i} class scores are {tuple(s.shape)} in the student "
                    f"and {tuple(t.shape)} in the teacher; use the same anchor generator, "
                    "num_classes and neck strides"
                )
            s_rows.append(anchor_logits(s, self.num_outputs))
            t_rows.append(anchor_logits(t, self.num_outputs))
        return self.weight * fn(torch.cat(s_rows), torch.cat(t_rows), self.temperature)
