"""The contract every distillation term implements.

Vocabulary: a *term* is the object a user configures (``terms:`` in a config, a
:class:`DistillTerm` in Python): one loss of a published distillation *method* (KD, UNIC,
...), with its own parameters, that a :class:`~visdistill.DistillationModule` adds to the
student's loss. Several terms compose in one module.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import Backbone, ModelOutput

_PLAIN = (bool, int, float, str, type(None))


@dataclass
class TermOutput:
    """What one call of a term gives the module.

    Attributes:
        losses: named, *unweighted* scalar losses; the module adds ``weight * sum(values)``
            to the total and logs each as ``<name>/<key>`` (``<name>`` alone when the key is
            the term's name).
        teacher_weights: ``(B, M)`` per-sample weights over the term's teachers (rows sum to
            1), returned by a term that declares ``provides_teacher_weights``; ``None`` for
            every other term.
        metrics: detached scalar diagnostics that are not losses (routing frequencies,
            discriminator accuracy), logged as ``train/<name>/<key>``.
    """

    losses: dict[str, Tensor]
    teacher_weights: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


class DistillTerm(nn.Module):
    """One distillation term, composable with others in a :class:`DistillationModule`.

    A term declares what it reads, so the module computes nothing else:

    - ``student_stages`` / ``teacher_stages``: stage indices (into ``feature_info``);
    - ``needs_pooled``: whether it reads ``(B, D)`` pre-logits features;
    - ``needs_prefix_tokens``: whether it reads the student's class/register tokens at its
      stages (``ModelOutput.prefix_tokens``; ViT-like students only). Set it in ``setup``;
    - ``needs_teacher_logits``: whether it reads the teachers' logits themselves, not only
      the distributions they define (a teacher cache stores log-probabilities, which give
      the same softmax at any temperature but not the same logits);
    - ``needs_logits``: whether it reads class predictions (``ModelOutput.logits``) of the
      student and of its teachers. Such a term is refused, naming it and the model, when the
      student or one of its teachers is headless (``num_classes: 0``, ``logits`` is
      ``None``); give it ``teachers=[...]`` to read only the classifier teachers;
    - ``needs_labels``: whether it reads ``target`` (class labels). Such a term is refused
      when the data has no labels.

    Which teachers a term reads: ``teachers`` (constructor argument) lists them by name
    (their ``alias`` or short name, as in ``val/<name>_acc``) or by position; ``None``
    means all. The module builds and calls the term with those teachers only (``setup``
    gets their backbones, ``forward`` their outputs, in the listed order), so a term never
    sees a teacher it did not ask for. ``teacher_stages`` given per teacher and the
    ``(B, M)`` teacher weights are over the term's own teachers.

    ``setup(student, teachers)`` runs once when the module is built, before any
    forward pass: build projectors from ``feature_info`` there, so the optimizer sees
    them. ``forward`` is called once per step and returns everything the module needs:
    a dict of named, *unweighted* losses, or a :class:`TermOutput` (the losses plus
    teacher weights and diagnostics). The module adds ``weight * sum(losses)`` to the total
    and logs each loss under ``<name>/<key>``.

    Per-sample teacher weights are how multi-teacher methods compose with any other term:
    a term that declares ``provides_teacher_weights = True`` returns a ``(B, M)`` matrix
    (rows sum to 1) as ``TermOutput.teacher_weights``. The module calls such a term first
    (with ``teacher_weights=None``) and passes its weights to every other term that reads
    the same teachers (``None``, meaning uniform, to a term that reads other teachers). At
    most one term per module may provide weights.

    Training-time context a term may read: ``progress`` (fraction of the fit done, in
    ``[0, 1]``) and ``epoch`` (fractional epoch), refreshed before every training step;
    and :meth:`on_fit_start`, called once before the first epoch with the module, for
    work that needs data (e.g. teacher class means).

    Diagnostics that are not losses (routing frequencies, discriminator accuracy) go in
    ``TermOutput.metrics``: detached scalars that the module keeps in ``last_metrics`` and
    logs as ``train/<name>/<key>`` on the steps whose metrics reach the loggers, never
    added to the loss.

    Hyper-parameters: every constructor calls :meth:`save_config` (after
    ``super().__init__``); :meth:`config` then returns the arguments as a LightningCLI-style
    ``{"class_path", "init_args"}`` dict of plain types, which the module stores in its
    hyper-parameters so ``load_from_checkpoint`` rebuilds the terms
    (:func:`term_from_config`).

    Contract: the project's term contract test checks every term class of the package (built
    from a config, checkpoint round trip, frozen teachers, finite loss at extreme inputs,
    zero case; see the contributing guide, "Adding a method"). ``zero_parts`` names the
    losses that are exactly 0 when every teacher is the student itself; ``contract_exempt``
    maps a check that does not apply to the reason.

    Args:
        weight: multiplier of this term in the total loss.
        teachers: the teachers this term reads, by name or position (``None``: all).
    """

    name: str = "term"
    student_stages: tuple[int, ...] = ()
    teacher_stages: tuple[int, ...] = ()
    needs_pooled: bool = False
    needs_prefix_tokens: bool = False
    needs_teacher_logits: bool = False
    needs_logits: bool = False
    needs_labels: bool = False
    provides_teacher_weights: bool = False
    #: Whether ``setup`` built layers for the student's configured grid (OFA's token exits):
    #: such a term refuses multi-resolution training (``student_sizes``).
    fixed_student_grid: bool = False
    #: Losses that are exactly 0 when every teacher the term reads is the student itself
    #: (same outputs): the term's documented zero case, checked by the contract test.
    zero_parts: ClassVar[tuple[str, ...]] = ()
    #: Contract checks that do not apply to this term, each mapped to the reason
    #: (``"zero_case"`` when ``zero_parts`` is empty).
    contract_exempt: ClassVar[dict[str, str]] = {}
    # The arguments recorded by save_config(); None: not recorded or not plain values.
    _config_args: dict[str, Any] | None = None

    def __init__(self, weight: float = 1.0, teachers: Sequence[str | int] | None = None) -> None:
        super().__init__()
        self.save_config()  # records only for a subclass without an __init__ of its own
        self.weight = float(weight)
        if teachers is not None and (isinstance(teachers, (str, int)) or not list(teachers)):
            raise ConfigError(
                f"{type(self).__name__} teachers must be a non-empty list of teacher names or "
                f"positions (or null for all teachers), got {teachers!r}"
            )
        self.teacher_refs: tuple[str | int, ...] | None = (
            tuple(teachers) if teachers is not None else None
        )
        # Positions in the module's ensemble, resolved by the module from teacher_refs.
        self.teacher_indices: tuple[int, ...] = ()
        self.progress = 0.0
        self.epoch = 0.0
        self.last_metrics: dict[str, Tensor] = {}

    def save_config(self) -> None:
        """Record the arguments of the constructor that calls this, for :meth:`config`.

        Lightning's ``save_hyperparameters`` idiom: the arguments are read from the calling
        constructor's frame, so call it right after ``super().__init__(...)``, before the
        constructor rebinds any of them. Only the constructor of the instance's own class
        records; the same call in a base class's constructor (reached through
        ``super().__init__``) records nothing. So a subclass with an ``__init__`` of its own
        calls it too, or it has no config (and cannot be rebuilt from a checkpoint).
        ``**kwargs`` are recorded flat; ``os.PathLike`` values as strings, tuples as lists.
        """
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        try:
            init = inspect.unwrap(type(self).__init__)
            if caller is None or caller.f_code is not getattr(init, "__code__", None):
                return
            self._config_args = _recorded_arguments(inspect.signature(init), caller.f_locals)
        finally:
            del frame, caller  # frames hold every local of the constructor

    def config(self) -> dict[str, Any] | None:
        """``{"class_path": ..., "init_args": {...}}`` that rebuilds this term, or ``None``
        when its constructor did not call :meth:`save_config`, or an argument is not a plain
        value (a tensor, a callable): such a term must be passed again to
        ``load_from_checkpoint``."""
        if self._config_args is None:
            return None
        return {
            "class_path": _class_path(type(self)),
            "init_args": dict(self._config_args),
        }

    def lr_scales(self) -> list[tuple[list[nn.Parameter], float]]:
        """Parameters of this term that train at another learning rate: ``(params, scale)``
        pairs, each its own optimizer param group at ``scale`` times the optimizer's lr
        (schedulers keep the ratio). Parameters not listed train at the optimizer's lr."""
        return []

    def setup(self, student: Backbone, teachers: Sequence[Backbone]) -> None:
        """Build parameters that depend on the models (projectors, class means ...)."""

    def own(self, items: Sequence[Any]) -> list[Any]:
        """The elements of a per-teacher sequence over the module's whole ensemble (teacher
        backbones, outputs) that belong to this term's teachers, in the term's order."""
        return [items[i] for i in self.teacher_indices]

    def warmup_factor(self, warmup_epochs: float) -> float:
        """``min(1, epoch / warmup_epochs)`` (1 when ``warmup_epochs`` is 0)."""
        return 1.0 if warmup_epochs <= 0 else min(1.0, self.epoch / warmup_epochs)

    def on_fit_start(self, module: Any) -> None:
        """Called once by the :class:`DistillationModule` before training starts."""

    def forward(
        self,
        student: ModelOutput,
        teachers: Sequence[ModelOutput],
        target: Tensor,
        teacher_weights: Tensor | None = None,
    ) -> dict[str, Tensor] | TermOutput:
        """The term's losses for one batch.

        Args:
            student: the student's output (``logits`` ``(B, K)``, and the ``pooled``
                ``(B, D)``, ``stages`` ``(B, C, h, w)`` and prefix tokens the term declared).
            teachers: the outputs of this term's teachers, in its order, computed without
                gradient.
            target: ``(B,)`` class labels (``-1`` on data without labels).
            teacher_weights: ``(B, M)`` per-sample weights over these teachers from the
                providing term, or ``None`` (uniform).

        Returns:
            named, unweighted losses, or a :class:`TermOutput`.
        """
        raise NotImplementedError


def as_term_output(term: DistillTerm, result: Mapping[str, Tensor] | TermOutput) -> TermOutput:
    """What ``term``'s forward returned, as a :class:`TermOutput`, checked against the term's
    declaration: a weight provider returns teacher weights, any other term returns none."""
    out = result if isinstance(result, TermOutput) else TermOutput(dict(result))
    label = type(term).__name__
    if term.provides_teacher_weights and out.teacher_weights is None:
        raise TypeError(
            f"{label} declares provides_teacher_weights but its forward returned no teacher "
            "weights: return TermOutput(losses, teacher_weights=...)"
        )
    if not term.provides_teacher_weights and out.teacher_weights is not None:
        raise TypeError(
            f"{label} returned teacher weights without declaring them: set "
            "provides_teacher_weights = True on the class"
        )
    return out


def uniform_or(teacher_weights: Tensor | None, batch: int, n_teachers: int, like: Tensor) -> Tensor:
    """``teacher_weights`` ``(B, M)``, or uniform ``1/M`` weights when it is ``None``."""
    if teacher_weights is None:
        return like.new_full((batch, n_teachers), 1.0 / n_teachers, dtype=torch.float32)
    if teacher_weights.shape != (batch, n_teachers):
        raise ValueError(
            f"teacher_weights must be (batch, teachers) = ({batch}, {n_teachers}), "
            f"got {tuple(teacher_weights.shape)}"
        )
    return teacher_weights.float()


def is_plain(value: Any) -> bool:
    """Whether ``value`` is made of plain types only (what a checkpoint's hyper-parameters
    may hold to load with ``torch.load(weights_only=True)``)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def _recorded_arguments(
    signature: inspect.Signature, values: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The constructor arguments named by ``signature`` (``self`` excluded) from its frame's
    ``values``, as plain types; ``None`` when one cannot be replayed by keyword."""
    record: dict[str, Any] = {}
    for name, param in list(signature.parameters.items())[1:]:
        value = values[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            record.update(value)
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        record[name] = value
    for name, value in record.items():
        if isinstance(value, os.PathLike):
            record[name] = os.fspath(value)
        elif isinstance(value, tuple):
            record[name] = list(value)
    return record if is_plain(record) else None


def _class_path(cls: type) -> str:
    """``visdistill.KD`` for a class the package exports at its top level (a path that
    survives moving the class between files), else ``module.QualName``."""
    import visdistill

    if cls.__module__.startswith("visdistill.") and getattr(visdistill, cls.__name__, None) is cls:
        return f"visdistill.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def list_terms(package: str = "visdistill") -> list[type[DistillTerm]]:
    """Every public term class defined in ``package`` (and imported), sorted by class path:
    the registry the contract test iterates. A class counts when it subclasses
    :class:`DistillTerm` directly or indirectly and its name does not start with ``_``."""
    found: dict[str, type[DistillTerm]] = {}
    stack = list(DistillTerm.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        module = cls.__module__
        if cls.__name__.startswith("_") or not (
            module == package or module.startswith(f"{package}.")
        ):
            continue
        found[f"{module}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


def term_from_config(spec: DistillTerm | dict[str, Any]) -> DistillTerm:
    """A term from ``{"class_path": "visdistill.KD", "init_args": {...}}`` (as saved in a
    checkpoint's hyper-parameters, or written in a config); a term is returned as is.

    Only ``visdistill`` modules are imported here: a checkpoint must not be able to import
    arbitrary code. A term of your own must be imported (or passed as ``terms=``) first.
    """
    if isinstance(spec, DistillTerm):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(
            f"a term must be a DistillTerm or a {{'class_path': ..., 'init_args': ...}} dict, "
            f"got {spec!r}"
        )
    path = str(spec["class_path"])
    module_name, _, cls_name = path.rpartition(".")
    if module_name == "visdistill.distillers" or module_name.startswith("visdistill.distillers."):
        # checkpoints written before the package folder was renamed to visdistill/terms
        module_name = "visdistill.terms" + module_name[len("visdistill.distillers") :]
    module = sys.modules.get(module_name)
    if module is None and (module_name == "visdistill" or module_name.startswith("visdistill.")):
        module = importlib.import_module(module_name)
    if module is None:
        raise ConfigError(
            f"term class {path!r}: module {module_name!r} is not imported, and only visdistill "
            "modules are imported from a checkpoint; import it first, or pass terms=[...] to "
            "load_from_checkpoint"
        )
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, DistillTerm)):
        raise ConfigError(f"{path!r} is not a DistillTerm class")
    return cls(**dict(spec.get("init_args") or {}))
