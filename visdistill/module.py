"""DistillationModule: a student, 0..N frozen teachers and a list of distillation terms."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from . import resume
from .checkpoints import use_atomic_checkpoint_io
from .data.base import data_has_labels
from .data.mixing import hard_labels
from .errors import ConfigError
from .fast_path import compile_models, leave_fast_path, use_channels_last
from .lightning_private import attached_trainer, logs_reach_loggers, repair_epoch_progress
from .models import Backbone, ModelConfig, ModelOutput
from .multi_resolution import StudentSizes
from .nonfinite import NonFiniteGuard
from .quiet import ExpectedWarnings
from .setup_checks import check_data, check_models, check_weight_providers
from .teacher_scores import TeacherScores
from .teacher_source import CachedTeachers, LiveTeachers, TeacherSource, check_teacher_precision
from .teachers import TeacherEnsemble, teacher_stages_requested
from .terms.base import DistillTerm, TermOutput, as_term_output, is_plain, term_from_config


def _as_config(value: ModelConfig | dict[str, Any]) -> ModelConfig:
    return value if isinstance(value, ModelConfig) else ModelConfig(**value)


def _hyperparameters(
    student: ModelConfig,
    teachers: list[ModelConfig],
    terms: list[DistillTerm],
    ce_weight: float,
    label_smoothing: float,
    **options: Any,
) -> dict[str, Any]:
    """What ``load_from_checkpoint`` rebuilds the module from, in plain types only
    (checkpoints must load with ``torch.load(weights_only=True)``)."""
    hparams: dict[str, Any] = {
        "student": asdict(student),
        "teachers": [asdict(t) for t in teachers],
        "ce_weight": ce_weight,
        "label_smoothing": label_smoothing,
    }
    term_configs = [t.config() for t in terms]
    # Terms whose arguments are all plain values are rebuilt by load_from_checkpoint.
    if all(c is not None for c in term_configs):
        hparams["terms"] = term_configs
    # The run's plain training options, so a checkpoint says how it was trained and
    # load_from_checkpoint rebuilds them. Not teacher_cache: a path on the training machine.
    hparams.update({k: v for k, v in options.items() if is_plain(v)})
    return hparams


class DistillationModule(L.LightningModule):
    """Train a timm student, optionally distilling from frozen timm teachers.

    The loss is ``ce_weight * CE(student, labels) + sum_t t.weight * sum(t(...).values())``.
    With no teachers it is plain supervised training (teacher recipes, no-KD baselines).

    Headless models and data without labels: a model with ``num_classes: 0`` has no
    classifier (its ``ModelOutput.logits`` is ``None``, its ``pooled`` features are its
    output). A headless teacher is a feature teacher, for terms that read stages or pooled
    features (UNIC, TRG, DisWOT); a term that reads logits (``needs_logits``: KD, DKD,
    MEAL V2, MST routing, OFA) is refused if the student or one of its teachers is
    headless; give it ``teachers: [...]`` to read the classifier teachers only. There is
    no cross-entropy when the student is headless or the data has no labels (then
    ``ce_weight`` must be 0). Accuracy (``train/acc``, ``val/acc``, ``test/acc``) is
    measured only for a classifier student on labelled data; otherwise ``val/loss`` and
    ``test/loss`` are the distillation loss (the weighted terms) on those splits, and
    :meth:`selection_metric` is ``val/loss`` (lower is better) instead of ``val/acc``.

    Args:
        student: the model to train (:class:`ModelConfig` or an equivalent dict).
        teachers: frozen teachers, each with its own input spec and weights.
        terms: distillation terms (e.g. ``KD``, or ``{"class_path", "init_args"}`` dicts);
            each needs at least one teacher and reads all of them unless its ``teachers``
            argument names some. Their constructor arguments are saved with the
            hyper-parameters, so ``load_from_checkpoint(path)`` rebuilds them.
        ce_weight: weight of the hard-label cross-entropy (unused by a headless student;
            must be 0 on data without labels).
        label_smoothing: label smoothing of that cross-entropy.
        optimizer: callable ``params -> Optimizer`` (LightningCLI ``class_path``).
        scheduler: optional callable ``optimizer -> LRScheduler``.
        scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        eval_teachers: report each teacher's and the ensemble's accuracy in validation
            (computed on the first validation epoch only: frozen teachers do not change)
            and test.
        nonfinite: what a NaN/inf training loss does: ``"skip"`` the step (no update; a
            warning naming the loss components at fault, counted in
            ``train/nonfinite_steps``), ``"raise"`` a :class:`NonFiniteLossError` naming them,
            or ``"ignore"`` (no check, no host sync). A skipped step leaves the student's and
            the terms' buffers (BatchNorm and UNIC running statistics ...), the torch RNG, the
            optimizer and step-interval schedulers as they were before it.
        nonfinite_max_consecutive: with ``nonfinite="skip"``, stop with a
            :class:`NonFiniteLossError` after this many skipped steps in a row (``None``: never).
        nonfinite_max_fraction: with ``nonfinite="skip"``, stop once more than this fraction of
            the run's training steps were skipped, checked from its 20th step on (``None``:
            never).
        teacher_cache: directory built by ``visdistill cache`` (:mod:`visdistill.teacher_cache`):
            training steps read the teachers' soft targets (and pooled features) from it
            instead of running the teachers; checked against the teachers, data and
            augmentation when fit starts. Terms that read teacher stages or pooled features
            need a cache that holds them.
        teacher_precision: ``"auto"`` (bf16 autocast for the teachers on CUDA, fp32
            elsewhere), ``"bf16"`` (bf16 autocast on any device) or ``"32"``.
        channels_last: on CUDA and CPU, put student and teachers in ``channels_last``
            memory format (faster convolutions: tensor cores on CUDA, oneDNN's NHWC kernels
            on CPU).
        compile: ``torch.compile`` the student and each teacher in place when fit starts
            (``True``, or a dict of ``torch.compile`` kwargs such as ``{"mode":
            "max-autotune"}``); state-dict keys are unchanged, so checkpoints and exports
            are unaffected.
        student_sizes: multi-resolution training (:mod:`visdistill.multi_resolution`): each
            training step resizes the student's input to one of these sides, drawn from
            ``(student_sizes_seed, global_step)``; teachers keep their own sizes, evaluation
            runs at the student's configured size. ``None``: always the configured size.
        student_sizes_seed: seed of those draws.
    """

    def __init__(
        self,
        student: ModelConfig,
        teachers: list[ModelConfig] | None = None,
        terms: list[DistillTerm] | None = None,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        eval_teachers: bool = True,
        nonfinite: str = "skip",
        nonfinite_max_consecutive: int | None = 10,
        nonfinite_max_fraction: float | None = 0.5,
        teacher_cache: str | None = None,
        teacher_precision: str = "auto",
        channels_last: bool = True,
        compile: bool | dict[str, Any] = False,
        student_sizes: list[int] | None = None,
        student_sizes_seed: int = 0,
    ) -> None:
        super().__init__()
        student_cfg = _as_config(student)
        teacher_cfgs = [_as_config(t) for t in teachers or []]
        terms = [term_from_config(t) for t in terms or []]
        self.save_hyperparameters(
            _hyperparameters(
                student_cfg,
                teacher_cfgs,
                terms,
                ce_weight,
                label_smoothing,
                scheduler_interval=scheduler_interval,
                eval_teachers=eval_teachers,
                nonfinite=nonfinite,
                nonfinite_max_consecutive=nonfinite_max_consecutive,
                nonfinite_max_fraction=nonfinite_max_fraction,
                teacher_precision=teacher_precision,
                channels_last=channels_last,
                compile=compile,
                student_sizes=list(student_sizes) if student_sizes is not None else None,
                student_sizes_seed=student_sizes_seed,
            )
        )
        self.student = Backbone.from_config(student_cfg)
        self.teachers = TeacherEnsemble(teacher_cfgs) if teacher_cfgs else None
        self.terms = nn.ModuleList(terms)
        check_models(self.student, self.teachers, self.terms)
        # NaN/inf losses: this run's policy and counters; the count that survives
        # checkpoints and resumes is a buffer.
        self.nonfinite_guard = NonFiniteGuard(
            nonfinite, nonfinite_max_consecutive, nonfinite_max_fraction
        )
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.eval_teachers = scheduler_interval, eval_teachers

        # Terms build their parameters first: some pick their stages from feature_info.
        for term in self.terms:
            self._bind_teachers(term)
            term.setup(self.student, term.own(list(self.teachers)))
        self.student_stages = tuple(sorted({s for t in self.terms for s in t.student_stages}))
        self.student_sizes = (
            None
            if student_sizes is None
            else StudentSizes(student_sizes, student_sizes_seed, self.student, self.terms)
        )
        self.teacher_stages = teacher_stages_requested(self.terms, len(self.teachers or []))
        self.needs_pooled = any(t.needs_pooled for t in self.terms)
        self.needs_prefix_tokens = any(t.needs_prefix_tokens for t in self.terms)
        check_teacher_precision(teacher_precision)
        self.teacher_precision = teacher_precision
        self.channels_last, self.compile_options = channels_last, compile
        # Where training steps get the teachers' outputs: the teachers themselves, or (from
        # fit start) the teacher cache. Evaluation always runs the teachers.
        self.live_teachers: TeacherSource | None = None
        if self.teachers is not None:
            self.live_teachers = LiveTeachers(
                self.teachers, self.teacher_stages, self.needs_pooled, teacher_precision
            )
        self.train_teachers = self.live_teachers
        self.teacher_cache_dir = teacher_cache
        if teacher_cache is not None:
            CachedTeachers.check_usable(
                self.teachers,
                list(self.terms),
                teacher_cache,
                self.teacher_stages,
                self.needs_pooled,
            )
        check_weight_providers(self.terms)
        self.student.check_stages(self.student_stages)
        for teacher, stages in zip(self.teachers or [], self.teacher_stages, strict=True):
            teacher.check_stages(stages)

        # Whether the data carries labels: set from the data module by setup().
        self._labelled = True
        k = self.student.num_classes
        if not self.student.headless:  # a headless student has no accuracy to measure
            self.train_acc = MulticlassAccuracy(k, average="micro")
            self.val_acc = MulticlassAccuracy(k, average="micro")
            self.test_acc = MulticlassAccuracy(k, average="micro")
        self.teacher_scores = TeacherScores(self.teachers)

    def _bind_teachers(self, term: DistillTerm) -> None:
        """Resolve the teachers ``term`` reads (its ``teachers`` names or positions; all by
        default) into ``term.teacher_indices``, and refuse a term that reads logits when the
        student or one of its teachers is headless."""
        teachers, names = list(self.teachers), self.teachers.names
        label = type(term).__name__
        if term.teacher_refs is None:
            indices = list(range(len(teachers)))
        else:
            indices = []
            for ref in term.teacher_refs:
                if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(names):
                    indices.append(ref)
                elif isinstance(ref, str) and ref in names:
                    indices.append(names.index(ref))
                else:
                    raise ConfigError(
                        f"{label} teachers: {ref!r} is not a teacher; the teachers are "
                        f"{', '.join(f'{i}: {n}' for i, n in enumerate(names))} (give names "
                        "or positions)"
                    )
            if len(set(indices)) != len(indices):
                raise ConfigError(f"{label} teachers lists a teacher twice: {term.teacher_refs}")
        term.teacher_indices = tuple(indices)
        if not term.needs_logits:
            return
        if self.student.headless:
            raise ConfigError(
                f"{label} reads the student's logits, but the student {self.student.name} is "
                "headless (num_classes 0); give the student num_classes, or use a feature "
                "term (UNIC, TRG, DisWOT)"
            )
        headless = [names[i] for i in indices if teachers[i].headless]
        if headless:
            classifiers = [names[i] for i in self.teachers.classifiers]
            fix = (
                f"list the classifier teachers it should read: teachers: [{', '.join(classifiers)}]"
                if classifiers
                else "give a teacher num_classes, or use a feature term (UNIC, TRG, DisWOT)"
            )
            raise ConfigError(
                f"{label} reads the teachers' logits, but teacher(s) {', '.join(headless)} "
                f"are headless (num_classes 0, features only); {fix}"
            )

    @property
    def logs_accuracy(self) -> bool:
        """Whether the student's accuracy is measured: it has a classifier and the data
        has labels."""
        return not self.student.headless and self._labelled

    def selection_metric(self, datamodule: Any = None) -> tuple[str, str]:
        """The validation metric that picks the best checkpoint and its mode: ``("val/acc",
        "max")`` for a classifier student on labelled data, else ``("val/loss", "min")``
        (the distillation loss). ``datamodule``: the data to judge labels by (default: the
        data this module was set up with)."""
        labelled = data_has_labels(datamodule) if datamodule is not None else self._labelled
        if not self.student.headless and labelled:
            return "val/acc", "max"
        return "val/loss", "min"

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        self._labelled = data_has_labels(getattr(trainer, "datamodule", None))
        if stage == "fit" and trainer is not None:  # before DDP wraps the model: see there
            use_channels_last(self, trainer.strategy.root_device, self.channels_last)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Student logits ``(B, K)`` for a canonical batch ``(B, 3, H, W)`` in ``[0, 1]``;
        for a headless student its pooled features ``(B, D)`` (as timm's headless models)."""
        out = self.student(images)
        return out.pooled if out.logits is None else out.logits

    def compute_losses(
        self, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor], ModelOutput]:
        """Total loss, its named components and the student's output for one batch."""
        images, target = batch["image"], batch["target"]
        # Mixup/CutMix batches carry soft targets (B, K): the CE takes them as they are; terms
        # that read labels get each mixed image's dominant class (docs/data.md).
        labels = hard_labels(target)
        resize = self.training and self.student_sizes is not None  # this step's student size
        student_out = self.student(
            self.student_sizes.preprocess(self.student, images, self.global_step)
            if resize
            else images,
            stages=self.student_stages,
            pooled=self.needs_pooled,
            prefix_tokens=self.needs_prefix_tokens,
            preprocessed=resize,
        )
        parts: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        if self.logs_accuracy:  # a classifier student and labels: the cross-entropy
            parts["ce"] = F.cross_entropy(
                student_out.logits, target, label_smoothing=self.label_smoothing
            )
            total = self.ce_weight * parts["ce"]
        if self.terms:
            teacher_outs = self.teacher_outputs(batch)
            # One call per term, the weight provider first: its per-sample weights over its
            # teachers reach the terms that read the same teachers; the others average their
            # own teachers uniformly.
            outputs: dict[int, TermOutput] = {}
            weights, weighted = None, None
            for i, term in enumerate(self.terms):
                if term.provides_teacher_weights:
                    outputs[i] = as_term_output(
                        term, term(student_out, term.own(teacher_outs), labels)
                    )
                    weights, weighted = outputs[i].teacher_weights, term.teacher_indices
            for i, term in enumerate(self.terms):
                if i not in outputs:
                    term_weights = weights if term.teacher_indices == weighted else None
                    result = term(
                        student_out, term.own(teacher_outs), labels, teacher_weights=term_weights
                    )
                    outputs[i] = as_term_output(term, result)
            # Summed in declaration order, as before providers ran first.
            for i, term in enumerate(self.terms):
                losses = outputs[i].losses
                for key, value in losses.items():
                    parts[f"{term.name}/{key}" if key != term.name else key] = value
                total = total + term.weight * sum(losses.values())
                term.last_metrics = outputs[i].metrics
        return total, parts, student_out

    def teacher_outputs(self, batch: dict[str, Tensor]) -> list[ModelOutput]:
        """One :class:`ModelOutput` per teacher for ``batch``: from the training source
        (the teacher cache when one is configured) in training, from the teachers otherwise
        (the cache holds the training split only)."""
        source = self.train_teachers if self.training else self.live_teachers
        return source.outputs(batch, epoch=self.current_epoch)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        self._update_term_progress(batch_idx)
        saved = self.nonfinite_guard.before_step(self)
        total, parts, out = self.compute_losses(batch)
        if self.nonfinite_guard.skips(self, total, parts, saved, batch_idx):
            return None  # no update; buffers and RNG are as before the step
        if self.logs_accuracy:
            # update(), not __call__: the epoch value is all we log, no per-batch compute.
            self.train_acc.update(out.logits.detach(), hard_labels(batch["target"]))
        n = len(batch["target"])
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        if self._components_logged_this_step():
            self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
            diagnostics = {
                f"train/{term.name}/{k}": v
                for term in self.terms
                for k, v in term.last_metrics.items()
            }
            if diagnostics:
                self.log_dict(diagnostics, batch_size=n)
        if self.logs_accuracy:
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        # The components ride along to callbacks (LogLineProgressBar averages them per line)
        # without a host sync: Lightning passes this dict as `outputs`.
        return {"loss": total, "parts": {k: v.detach() for k, v in parts.items()}}

    def _components_logged_this_step(self) -> bool:
        """Log the loss components on the first step and on the steps whose metrics reach the
        loggers (``trainer.log_every_n_steps``) only: every ``self.log`` call costs Lightning
        bookkeeping, and in between the values would only refresh ``callback_metrics``."""
        trainer = attached_trainer(self)
        if trainer is None or self.global_step == 0 or trainer.fast_dev_run:
            return True
        return logs_reach_loggers(trainer)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images, target = batch["image"], batch["target"]
        if self.logs_accuracy:
            logits = self.student(images).logits
            self.val_acc(logits, target)
            self.log("val/acc", self.val_acc, prog_bar=True)
            self.log("val/loss", F.cross_entropy(logits, target), batch_size=len(target))
        else:  # no accuracy to measure: the distillation loss picks the best checkpoint
            total, _, _ = self.compute_losses(batch)
            self.log("val/loss", total, prog_bar=True, batch_size=len(target))
        if self._teachers_scored_this_epoch():
            self.teacher_scores.update(self.teachers(images), target)

    def on_validation_epoch_end(self) -> None:
        scores = self.teacher_scores
        if self._teachers_scored_this_epoch():
            scores.val_scores = scores.compute(self.teacher_names)
        for name, value in (scores.val_scores or {}).items():
            self.log(f"val/{name}_acc", value)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images, target = batch["image"], batch["target"]
        if self.logs_accuracy:
            self.test_acc(self.student(images).logits, target)
            self.log("test/acc", self.test_acc)
        else:
            total, _, _ = self.compute_losses(batch)
            self.log("test/loss", total, batch_size=len(target))
        if self._teachers_scored():
            self.teacher_scores.update(self.teachers(images), target)

    def on_test_epoch_end(self) -> None:
        if self._teachers_scored():
            for name, value in self.teacher_scores.compute(self.teacher_names).items():
                self.log(f"test/{name}_acc", value)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        if self.student.headless:
            raise ConfigError(
                f"the student {self.student.name} is headless (num_classes 0): it predicts no "
                "classes. Export it (visdistill export) and use its features with timm"
            )
        probs = self.student(batch["image"]).logits.softmax(-1)
        return {"index": batch["index"], "probs": probs, "pred": probs.argmax(-1)}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Lightning steps ``interval: step`` schedulers after every batch, also after one
        whose training step returned ``None``: a skipped (non-finite) step does not count."""
        if self.nonfinite_guard.scheduler_may_step(self, scheduler):
            super().lr_scheduler_step(scheduler, metric)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A Lightning 2.6 restart bug would make this epoch's checkpoints resume wrongly.
        repair_epoch_progress(self.trainer)

    def on_train_end(self) -> None:
        self.nonfinite_guard.warn_at_train_end(self)

    def _update_term_progress(self, batch_idx: int) -> None:
        trainer = attached_trainer(self)
        if not self.terms or trainer is None:
            return
        batches = trainer.num_training_batches
        epoch = trainer.current_epoch + (
            batch_idx / batches if batches and batches != float("inf") else 0.0
        )
        total = trainer.estimated_stepping_batches
        progress = self.global_step / total if total and total != float("inf") else 0.0
        for term in self.terms:
            term.epoch, term.progress = float(epoch), min(1.0, float(progress))

    # ------------------------------------------------------------------ teachers' scores
    def _teachers_scored(self) -> bool:
        """Whether teachers' accuracies are measured: asked for, some teacher has a
        classifier, and the data has labels."""
        return self.eval_teachers and self.teacher_scores.enabled and self._labelled

    def _teachers_scored_this_epoch(self) -> bool:
        return (
            self._teachers_scored()
            and self.teacher_scores.val_scores is None
            and not getattr(attached_trainer(self), "sanity_checking", False)
        )

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names in metric keys (``val/<name>_acc``): aliases or short names."""
        return self.teachers.names if self.teachers is not None else []

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self._param_groups())
        for group in optimizer.param_groups:  # absolute lr from the optimizer's own default
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def _param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters: one default group, plus one group per ``lr_scales`` entry of
        a term (with its ``lr_scale``), so schedulers scale every group alike."""
        scaled: list[dict[str, Any]] = []
        taken: set[int] = set()
        for term in self.terms:
            for params, scale in term.lr_scales():
                params = [p for p in params if p.requires_grad and id(p) not in taken]
                taken.update(id(p) for p in params)
                if params:
                    scaled.append({"params": params, "lr_scale": float(scale)})
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": rest, "lr_scale": 1.0}, *scaled]

    def on_fit_start(self) -> None:
        # Frozen teachers are in eval mode on purpose (Teacher.train() keeps them there), and
        # nonfinite="skip" returns None from training_step on purpose (and warns itself).
        self._expected_warnings = ExpectedWarnings(
            eval_modules=sum(1 for _ in self.teachers.modules()) if self.teachers else 0,
            skipped_steps=self.nonfinite_guard.mode == "skip",
            exact_iterable_length=getattr(self.trainer.datamodule, "exact_iterable_length", False),
        )
        self._expected_warnings.enter()
        use_atomic_checkpoint_io(self.trainer)  # .ckpt files: temp file beside, fsync, rename
        check_data(self, self.trainer.datamodule)
        compile_models(self.student, self.teachers, self.compile_options)
        if self.teacher_cache_dir is not None:
            self.train_teachers = CachedTeachers.open(
                self.teacher_cache_dir,
                self,
                self.trainer.datamodule,
                self.trainer.max_epochs,
                self.needs_pooled,
                self.teacher_stages,
                self.trainer.world_size,
            )
        for term in self.terms:
            term.on_fit_start(self)

    def on_fit_end(self) -> None:
        self._leave_expected_warnings()

    def teardown(self, stage: str) -> None:
        self._leave_expected_warnings()
        if stage == "fit":  # also after a failed fit
            leave_fast_path(self)

    def _leave_expected_warnings(self) -> None:
        expected = getattr(self, "_expected_warnings", None)
        if expected is not None:
            expected.exit()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # RNG states (exact resume) in; rebuildable frozen teachers' weights out.
        resume.on_save(self, checkpoint)
        # The names under which the teachers' metrics were logged (val/<name>_acc).
        checkpoint["teacher_names"] = self.teacher_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = attached_trainer(self)
        resume.on_load(self, checkpoint, getattr(trainer, "ckpt_path", None))
        if trainer is not None and trainer.state.fn == "fit":
            resume.restore_rng(checkpoint)
            resume.warn_if_other_data(self, checkpoint)
