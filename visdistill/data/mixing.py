"""Mixup and CutMix by timm's names, replayable, applied to whole training batches.

:class:`BatchMixer` runs :class:`timm.data.Mixup` (mixup: Zhang et al., ICLR 2018; CutMix:
Yun et al., ICCV 2019) on a collated batch, in the loader's collate function (worker side).
Its draws (mixup or CutMix, ``lam``, the CutMix box) come from :func:`replayed_rng` keyed by
``(data seed, epoch, index of the batch's first sample)``. The batches of an epoch are fixed
by :class:`~visdistill.data.replay.EpochSampler` (its order, ``batch_size`` and
``drop_last``), so the mixed image of every sample in every epoch is a pure function of the
data seed, the shuffle seed, the batch size and the mixing options: a teacher cache keyed by
``(epoch, index)`` holds the teachers' outputs on exactly the image the student sees.

timm mixes sample ``i`` of a batch of ``B`` with sample ``B - 1 - i`` (the batch flipped),
with weight ``lam_i`` on its own image. The batch gets ``mix_lam`` ``(B,)`` (``lam_i``;
1 for unmixed samples) and, on labelled data, a soft ``target`` ``(B, K)`` (timm's mixed,
label-smoothed one-hot). Teachers run on the mixed image (function matching: Beyer et al.,
"Knowledge distillation: A good teacher is patient and consistent", CVPR 2022).
:func:`approximate_mixed_targets` is the shortcut other tools take (mixing the teachers'
outputs on the unmixed images with the same ``lam``); :func:`mixed_target_error` measures
how far it is from the exact targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import Tensor, nn
from torch.utils.data import default_collate

from ..errors import ConfigError
from .replay import replayed_rng

MIXUP_MODES = ("batch", "pair", "elem")
# Last key element of a batch's mixing draws: never the key of a sample's own draws
# (seed, epoch, index), even for the batch's first sample. Batches without an epoch (streamed
# shards, a pass over the training set outside the training loop) get their own stream.
MIX_STREAM, MIX_STREAM_NO_EPOCH = 1, 2


class BatchMixer:
    """timm's Mixup / CutMix for ``{"image", "target", "index", "epoch"}`` batches.

    Args:
        num_classes: classes of the data (the soft target's ``K``).
        seed: the data seed (with the batch's epoch and first index, the mixing key).
        mixup_alpha: mixup's Beta(alpha, alpha) (0 = no mixup).
        cutmix_alpha: CutMix's Beta(alpha, alpha) (0 = no CutMix).
        cutmix_minmax: CutMix box side range as fractions of the image ``[low, high]``
            instead of ``cutmix_alpha`` (timm then uses alpha 1).
        mixup_prob: probability that a batch (or element/pair) is mixed at all.
        mixup_switch_prob: with both mixup and CutMix on, probability of CutMix.
        mixup_mode: ``batch`` (one ``lam`` per batch), ``pair`` or ``elem``.
        label_smoothing: smoothing of the one-hot labels before they are mixed.
    """

    def __init__(
        self,
        num_classes: int,
        seed: int = 0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        label_smoothing: float = 0.0,
    ) -> None:
        check_mixing_options(
            mixup_alpha,
            cutmix_alpha,
            cutmix_minmax,
            mixup_prob,
            mixup_switch_prob,
            mixup_mode,
            label_smoothing,
        )
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.options: dict[str, Any] = {
            "mixup_alpha": float(mixup_alpha),
            "cutmix_alpha": float(cutmix_alpha),
            "cutmix_minmax": [float(v) for v in cutmix_minmax] if cutmix_minmax else None,
            "mixup_prob": float(mixup_prob),
            "mixup_switch_prob": float(mixup_switch_prob),
            "mixup_mode": mixup_mode,
            "label_smoothing": float(label_smoothing),
        }

    def describe(self) -> dict[str, Any]:
        """What a teacher cache must agree on to replay the mixing (with the batch size,
        ``drop_last`` and shuffle, which the data module adds)."""
        return {"seed": self.seed, **self.options}

    def _timm(self, batch_size: int) -> Mixup:
        o = self.options
        # num_classes = batch size and targets 0..B-1: timm's "target" is then the mixing
        # matrix itself (row i: lam_i at column i, 1 - lam_i at column B-1-i), from which
        # lam_i is read; the real soft target is built from it below, as timm builds it.
        return Mixup(
            mixup_alpha=o["mixup_alpha"],
            cutmix_alpha=o["cutmix_alpha"],
            cutmix_minmax=o["cutmix_minmax"],
            prob=o["mixup_prob"],
            switch_prob=o["mixup_switch_prob"],
            mode=o["mixup_mode"],
            label_smoothing=0.0,
            num_classes=batch_size,
        )

    def mix(self, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mix ``images`` ``(B, C, H, W)`` with the current global RNGs.

        timm pairs sample ``i`` with ``B-1-i`` and needs an even ``B``; the training loader
        drops the last, short batch, and in an odd batch from elsewhere the last sample is
        left unmixed.

        Returns:
            ``(mixed images (B, C, H, W), target, lam (B,))``: ``target`` is timm's soft
            target ``(B, K)`` for labelled ``target`` ``(B,)``, and unchanged when the
            data has no labels (every target negative).
        """
        b = len(images)
        pairs = b - b % 2
        if pairs == 0:
            return images.clone(), target, torch.ones(b)
        mixed, weights = self._timm(pairs)(images[:pairs].clone(), torch.arange(pairs))
        lam = torch.ones(b, dtype=weights.dtype)
        lam[:pairs] = weights.diagonal()
        if pairs < b:
            mixed = torch.cat([mixed, images[pairs:]])
        if target.ndim == 1 and bool((target >= 0).all()):
            smoothing = self.options["label_smoothing"]
            soft = mixup_target(target[:pairs], self.num_classes, lam[:pairs, None], smoothing)
            if pairs < b:  # the unmixed last sample: its smoothed one-hot
                rest = mixup_target(target[pairs:], self.num_classes, 1.0, smoothing)
                soft = torch.cat([soft, rest])
            target = soft
        return mixed, target, lam

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` with its images mixed and its target soft, under the RNG seeded by
        ``(seed, epoch, index of the first sample, MIX_STREAM)``; a batch without ``epoch``
        by ``(seed, index of the first sample, MIX_STREAM_NO_EPOCH)``. The caller's random
        streams are left as they were."""
        first = int(batch["index"][0])
        if "epoch" in batch:
            key = (self.seed, int(batch["epoch"][0]), first, MIX_STREAM)
        else:
            key = (self.seed, first, MIX_STREAM_NO_EPOCH)
        out = dict(batch)
        with replayed_rng(*key):
            out["image"], out["target"], out["mix_lam"] = self.mix(batch["image"], batch["target"])
        return out


class MixupCollate:
    """``default_collate`` then :class:`BatchMixer`: the training loader's collate function
    (runs in the loader's workers; picklable)."""

    def __init__(self, mixer: BatchMixer) -> None:
        self.mixer = mixer

    def __call__(self, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.mixer(default_collate(samples))


def check_mixing_options(
    mixup_alpha: float,
    cutmix_alpha: float,
    cutmix_minmax: Sequence[float] | None,
    mixup_prob: float,
    mixup_switch_prob: float,
    mixup_mode: str,
    label_smoothing: float,
) -> None:
    """Refuse mixing options timm would reject deep in a loader worker (or silently
    misuse), each with the fix."""
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be >= 0 (0 = off), got {value}")
    if cutmix_minmax is not None and (
        len(cutmix_minmax) != 2 or not 0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1
    ):
        raise ConfigError(
            "cutmix_minmax is the CutMix box side range as fractions of the image, "
            f"[low, high] with 0 < low < high <= 1, got {list(cutmix_minmax)}"
        )
    for name, p in (("mixup_prob", mixup_prob), ("mixup_switch_prob", mixup_switch_prob)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name} is a probability in [0, 1], got {p}")
    if mixup_mode not in MIXUP_MODES:
        raise ConfigError(f"mixup_mode must be one of {', '.join(MIXUP_MODES)}, got {mixup_mode!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def mixing_enabled(
    mixup_alpha: float, cutmix_alpha: float, cutmix_minmax: Sequence[float] | None
) -> bool:
    """Whether these options mix at all (timm: mixup or CutMix alpha > 0, or a box range)."""
    return mixup_alpha > 0 or cutmix_alpha > 0 or cutmix_minmax is not None


def approximate_mixed_targets(probs: Tensor, lam: Tensor) -> Tensor:
    """The teachers' soft targets for a timm-mixed batch, approximated from their outputs
    on the *unmixed* images: ``lam_i * p_i + (1 - lam_i) * p_{B-1-i}``, mixing the
    per-image distributions as the labels are mixed (what caches of per-image soft labels
    do under mixup). The exact target is the teachers' output on the mixed image.

    Args:
        probs: per-image teacher probabilities ``(B, K)`` of the unmixed batch, in batch
            order (or ``(B, T, K)`` for ``T`` teachers).
        lam: the batch's ``mix_lam`` ``(B,)``.

    Returns:
        Approximate probabilities of the mixed batch, ``probs``' shape.
    """
    w = lam.to(probs.dtype).view(-1, *([1] * (probs.ndim - 1)))
    return w * probs + (1 - w) * probs.flip(0)


@torch.no_grad()
def mixed_target_error(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    mixed: Tensor,
    lam: Tensor,
    temperature: float = 1.0,
) -> dict[str, float]:
    """How far :func:`approximate_mixed_targets` is from the exact soft targets, for one
    batch and one classifier ``model`` (run under ``torch.no_grad()``, in eval mode when
    it is a module).

    Args:
        model: canonical images ``(B, 3, H, W)`` -> logits ``(B, K)`` (e.g.
            ``lambda x: teacher(x).logits`` for a :class:`~visdistill.models.Backbone`).
        images: the unmixed batch ``(B, 3, H, W)``.
        mixed: the same batch mixed by :class:`BatchMixer` ``(B, 3, H, W)``.
        lam: the batch's ``mix_lam`` ``(B,)``.
        temperature: softmax temperature of the targets (KD's ``T``).

    Returns:
        ``kl``: mean KL(exact || approximate) per sample (nats); ``max_abs_logp``: the
        largest absolute log-probability difference; ``top1_agreement``: the fraction of
        samples whose two targets have the same top class; ``mixed_fraction``: the fraction
        of samples actually mixed (``lam < 1``). Samples left unmixed have identical
        targets; the means are over all samples.
    """
    modules = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    for m, _ in modules:
        m.training = False
    try:
        exact = F.log_softmax(model(mixed).float() / temperature, -1)
        per_image = F.softmax(model(images).float() / temperature, -1)
    finally:
        for m, mode in modules:
            m.training = mode
    approx = approximate_mixed_targets(per_image, lam).clamp_min(1e-30).log()
    kl = (exact.exp() * (exact - approx)).sum(-1)
    return {
        "kl": float(kl.mean()),
        "max_abs_logp": float((exact - approx).abs().max()),
        "top1_agreement": float((exact.argmax(-1) == approx.argmax(-1)).float().mean()),
        "mixed_fraction": float((lam < 1).float().mean()),
    }


def hard_labels(target: Tensor) -> Tensor:
    """Class labels ``(B,)`` of a batch's ``target``: itself when it holds labels, the
    dominant class of each soft (mixed) target ``(B, K)`` otherwise (the class with the
    larger share of the mixed image, after smoothing)."""
    return target.argmax(-1) if target.is_floating_point() else target


# Terms refused under mixing: what they do with a label has no meaning for a mixed image.
_REFUSED_UNDER_MIXING = {
    "ND": "its class means are per-class averages of teacher embeddings of unmixed images "
    "(a pass over the mixed training loader would average mixed ones), and its loss pulls "
    "each embedding toward the mean of one class, while a mixed image shows two",
}


def check_mixing(module: Any, datamodule: Any) -> None:
    """Refuse, when fit starts, what cannot train on mixed batches: the module's own label
    smoothing on top of the data's (the mixed targets are already smoothed by
    ``label_smoothing`` on the data module) and terms whose labels would mean nothing
    (:data:`_REFUSED_UNDER_MIXING`). Terms that read labels otherwise (DKD, OFA, MST)
    get each mixed image's dominant class (:func:`hard_labels`)."""
    if not getattr(datamodule, "mixes", False):
        return
    if getattr(module, "label_smoothing", 0.0):
        raise ConfigError(
            f"model.label_smoothing {module.label_smoothing} would smooth the mixup/CutMix "
            "targets a second time; set label_smoothing on the data module (timm's Mixup "
            "smooths the labels before mixing them) and model.label_smoothing: 0"
        )
    for term in getattr(module, "terms", ()):
        reason = _REFUSED_UNDER_MIXING.get(type(term).__name__)
        if reason is not None:
            raise ConfigError(
                f"{type(term).__name__} cannot train on mixup/CutMix batches: {reason}; "
                "turn mixing off (mixup_alpha: 0, cutmix_alpha: 0, cutmix_minmax: null) or "
                "remove the term"
            )
