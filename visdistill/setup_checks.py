"""Refusals of set-ups that cannot train, each naming the problem and the fix: the models
against the terms (at construction) and against the data (when fit starts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data.base import data_has_labels
from .data.mixing import check_mixing
from .errors import ConfigError


def check_models(student: Any, teachers: Any, terms: Sequence[Any]) -> None:
    """Terms need teachers; a headless student needs a term; classifier teachers and a
    classifier student predict the same classes."""
    if terms and teachers is None:
        names = ", ".join(type(t).__name__ for t in terms)
        raise ConfigError(f"distillation terms ({names}) need teachers, but none are configured")
    if student.headless and not terms:
        raise ConfigError(
            f"the student {student.name} is headless (num_classes 0), so it has no "
            "classifier to train with labels: add a feature distillation term (e.g. UNIC) "
            "and a teacher, or give the student num_classes"
        )
    classes = teachers.num_classes if teachers is not None else 0
    if classes and not student.headless and classes != student.num_classes:
        raise ConfigError(
            f"teachers predict {classes} classes but the student "
            f"{student.name} predicts {student.num_classes}; set num_classes "
            "to the same value for all models (num_classes: 0 on a teacher used for its "
            "features only)"
        )


def check_weight_providers(terms: Sequence[Any]) -> None:
    """At most one term provides per-sample teacher weights."""
    weighting = [type(t).__name__ for t in terms if t.provides_teacher_weights]
    if len(weighting) > 1:
        raise ConfigError(
            f"terms {', '.join(weighting)} each provide per-sample teacher weights; "
            "keep one of them (the others can still read its weights)"
        )


def check_data(module: Any, datamodule: Any) -> None:
    """The data's labels against what the models and terms need: on data without labels
    nothing may read them (cross-entropy, ``needs_labels`` terms); on labelled data the
    classifiers' class count must be the data's."""
    student, teachers, terms = module.student, module.teachers, module.terms
    check_mixing(module, datamodule)
    if not data_has_labels(datamodule):
        data = type(datamodule).__name__
        if module.ce_weight and not student.headless:
            raise ConfigError(
                f"ce_weight {module.ce_weight} trains the student on labels, but the data "
                f"({data}) has none (labels: false, or a folder without class "
                "sub-folders); set model.ce_weight: 0 and distil from teachers"
            )
        if not terms:
            raise ConfigError(
                f"the data ({data}) has no labels and there are no distillation terms: "
                "nothing to learn from; add teachers and a term"
            )
        labelled = [type(t).__name__ for t in terms if t.needs_labels]
        if labelled:
            raise ConfigError(
                f"{', '.join(labelled)} read class labels, but the data ({data}) has none; "
                "remove them or train on labelled data"
            )
        return
    data_classes = getattr(datamodule, "num_classes", None)
    if student.headless:
        model_classes = teachers.num_classes if teachers is not None else 0
        who = "the classifier teachers predict"
    else:
        model_classes, who = student.num_classes, "the student predicts"
    if data_classes and model_classes and data_classes != model_classes:
        raise ConfigError(
            f"the data has {data_classes} classes but {who} {model_classes}; set "
            f"model.student.num_classes (and each classifier teacher's) to {data_classes}"
        )
