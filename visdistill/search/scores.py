"""The DisWOT score of a student for a teacher, at random initialisation.

Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training",
CVPR 2023 (arXiv 2303.15678). ``docs/search.md`` says where we differ from the
official code.

One labelled batch goes through the teacher and the candidate (copies, re-initialised):

- semantic ``M_s``: the gradient of plain cross-entropy w.r.t. each model's final classifier
  weight, ``(K, C)``, compared with the ICKD distance
  (:func:`~visdistill.losses.diswot.semantic_similarity`);
- relation ``M_r``: the last stage's features before global pooling, compared through their
  ``(B, B)`` batch Gram matrices (:func:`~visdistill.losses.diswot.relation_similarity`).

``score = M_s + M_r`` (the official README's combination: equal weights, no normalisation). Both are
negated distances: **higher is better**, 0 is the best possible value.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.diswot import CHANNEL_ADAPTERS, relation_similarity, semantic_similarity
from ..models import Backbone

COMPONENTS = ("semantic", "relation")
INITS = ("gaussian", "default")


@dataclass(frozen=True)
class DisWOTScore:
    """One candidate's score: the components used (``None`` when not used) and their sum."""

    semantic: float | None = None
    relation: float | None = None

    @property
    def total(self) -> float:
        return sum(v for v in (self.semantic, self.relation) if v is not None)

    def as_dict(self) -> dict[str, float | None]:
        return {"score": self.total, "semantic": self.semantic, "relation": self.relation}


def gaussian_init_(model: nn.Module) -> nn.Module:
    """Re-initialise in place as the official analysis scripts do
    (``network_weight_gaussian_init``): conv and linear weights ``N(0, 1)``, biases 0,
    normalisation layers weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return model


def classifier_weight(model: Backbone) -> Tensor:
    """The ``(K, C)`` weight of the final classifier (``get_classifier()``: a Linear, a 1x1
    conv, or the last Linear inside a head module)."""
    head = model.model.get_classifier()
    if isinstance(head, nn.Linear):
        return head.weight
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
        return head.weight
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].weight
    raise ConfigError(
        f"{model.name}: its classifier ({type(head).__name__}) has no linear weight, so the "
        "semantic metric (classifier-weight gradients) is undefined; score with "
        "use=('relation',) instead"
    )


def _check_use(use: Sequence[str]) -> tuple[str, ...]:
    use = tuple(use)
    bad = [u for u in use if u not in COMPONENTS]
    if bad or not use:
        raise ConfigError(f"use must be a non-empty subset of {COMPONENTS}, got {use}")
    return use


class DisWOTScorer:
    """Scores many students against one teacher on one batch.

    The teacher's reference (classifier gradient and last-stage relation matrix input) is
    computed once, on a copy; the teacher passed in is not modified.

    Args:
        teacher: a :class:`Backbone` (or :class:`~visdistill.Teacher`).
        images: ``(B, 3, H, W)`` canonical batch in ``[0, 1]`` (each model preprocesses
            itself); DisWOT uses one training batch of 64 on CIFAR.
        targets: ``(B,)`` labels.
        use: the components summed into the score.
        init: re-initialisation of the copies: ``"gaussian"`` (conv/linear ``N(0, 1)``, the
            official analysis scripts) or ``"default"`` (timm's own initialisation: the
            architecture rebuilt with ``timm.create_model`` under the seed).
        reinit_teacher: score against a randomly initialised teacher (the official search
            scripts never load teacher weights). ``False`` uses the teacher's trained
            weights, in eval mode.
        seed: seeds the students' re-initialisation and any dropout, so scores are
            reproducible and every candidate of a search sees the same random draw; the
            teacher's copy is drawn with ``seed + 1`` (else a student of the teacher's own
            architecture would be its exact clone).
        channel_adapter: ``"pool"`` (average channels to the narrower classifier width when
            teacher and student differ) or ``"none"`` (raise on a mismatch).

    Models run in train mode (BatchNorm on batch statistics, as at the start of training);
    a trained teacher (``reinit_teacher=False``) runs in eval mode.
    """

    def __init__(
        self,
        teacher: Backbone,
        images: Tensor,
        targets: Tensor,
        use: Sequence[str] = COMPONENTS,
        init: str = "gaussian",
        reinit_teacher: bool = True,
        seed: int = 0,
        channel_adapter: str = "pool",
    ) -> None:
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        if channel_adapter not in CHANNEL_ADAPTERS:
            raise ConfigError(
                f"channel_adapter must be one of {CHANNEL_ADAPTERS}, got {channel_adapter!r}"
            )
        if images.dim() != 4 or targets.shape != images.shape[:1]:
            raise ConfigError(
                f"images must be (B, 3, H, W) and targets (B,); got {tuple(images.shape)} and "
                f"{tuple(targets.shape)}"
            )
        if images.shape[0] < 2:
            raise ConfigError("the relation metric needs a batch of at least 2 images")
        self.use, self.init, self.seed = _check_use(use), init, int(seed)
        # Another draw for the teacher: with one seed, a student of the teacher's own
        # architecture would be an exact clone of the random teacher and score 0.
        self.teacher_seed = self.seed + 1
        self.reinit_teacher, self.channel_adapter = reinit_teacher, channel_adapter
        self.images, self.targets = images, targets.long()
        self.num_classes = teacher.num_classes
        if int(targets.max()) >= self.num_classes or int(targets.min()) < 0:
            raise ConfigError(
                f"labels span 0..{int(targets.max())} but the teacher {teacher.name} predicts "
                f"{self.num_classes} classes; build it with num_classes matching the data"
            )
        model = copy.deepcopy(teacher)
        if reinit_teacher:
            self._reinit(model, self.teacher_seed)
        self.teacher_grad, self.teacher_features = self._probe(model, train=reinit_teacher)

    def _reinit(self, model: Backbone, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.init == "gaussian":
                gaussian_init_(model)
            else:  # timm's own initialisation, drawn with this seed
                import timm

                kwargs = {**model.arch_kwargs, "in_chans": model.input_spec.in_chans}
                model.model = timm.create_model(model.arch, num_classes=model.num_classes, **kwargs)

    def _probe(self, model: Backbone, train: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """One forward (and, for the semantic part, one gradient of the classifier weight
        only: ``dCE/dW = (p - y)^T f`` needs no backward through the backbone)."""
        nn.Module.train(model, train)  # also for Teacher, whose train() stays in eval
        model.requires_grad_(True)
        stages = (-1,) if "relation" in self.use else ()
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(self.seed)
            # Backbone.forward: a Teacher's own forward runs under no_grad.
            out = Backbone.forward(model, self.images, stages=stages)
            grad = None
            if "semantic" in self.use:
                weight = classifier_weight(model)
                loss = F.cross_entropy(out.logits.float(), self.targets)
                (grad,) = torch.autograd.grad(loss, weight)
                grad = grad.reshape(grad.shape[0], -1).detach()
        features = out.stages[-1].detach() if stages else None
        return grad, features

    def __call__(self, student: Backbone, copy_model: bool = True) -> DisWOTScore:
        """Score ``student`` (a copy is re-initialised unless ``copy_model=False``, which
        re-initialises ``student`` itself: for throw-away candidates)."""
        if student.num_classes != self.num_classes:
            raise ConfigError(
                f"student {student.name} predicts {student.num_classes} classes, the teacher "
                f"{self.num_classes}; build both with the same num_classes"
            )
        model = copy.deepcopy(student) if copy_model else student
        self._reinit(model, self.seed)
        grad, features = self._probe(model)
        semantic = relation = None
        if grad is not None:
            semantic = float(semantic_similarity(self.teacher_grad, grad, self.channel_adapter))
        if features is not None:
            relation = float(relation_similarity(self.teacher_features, features))
        return DisWOTScore(semantic=semantic, relation=relation)


def diswot_score(
    teacher: Backbone,
    student: Backbone,
    images: Tensor,
    targets: Tensor,
    use: Sequence[str] = COMPONENTS,
    init: str = "gaussian",
    reinit_teacher: bool = True,
    seed: int = 0,
    channel_adapter: str = "pool",
) -> DisWOTScore:
    """The DisWOT score of ``student`` for ``teacher`` on one batch (higher = better).

    Neither model is modified: copies are re-initialised (see :class:`DisWOTScorer` for the
    arguments). Deterministic given ``seed``.
    """
    scorer = DisWOTScorer(
        teacher, images, targets, use, init, reinit_teacher, seed, channel_adapter
    )
    return scorer(student)
