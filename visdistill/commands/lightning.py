"""``visdistill fit | validate | test | predict``: LightningCLI (typed YAML with
``class_path``/``init_args``, ``--config``, ``--print_config``) with visdistill's defaults."""

from __future__ import annotations

import sys
from typing import Any, Literal

import lightning
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..callbacks import PredictionWriter
from ..checkpoints import AUTO_MONITOR, ResumableCheckpoint
from ..data.base import VisionDataModule
from ..module import DistillationModule
from ..progress import make_progress_bar
from ..summary import DistillationModelSummary, RunSummary
from .parsing import ConfigFile


class VisdistillCLI(LightningCLI):
    """LightningCLI with visdistill's defaults: best/last checkpoints, optional test after fit."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser, with a ``--config`` that reads the file first: a missing
        file, malformed YAML or a duplicate key is one line naming the file and line."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument(
            "-c",
            "--config",
            action=ConfigFile,
            help="Path to a configuration file in json or yaml format.",
        )
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, evaluate the best checkpoint (by val/acc; by val/loss without "
            "accuracy: a headless student or data without labels) on the test split",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="also write last.ckpt every N training steps (mid-epoch resume with "
            "--ckpt_path last; by default it is written at every epoch end)",
        )
        parser.add_argument(
            "--run_folder",
            type=Literal["refuse", "overwrite", "new_version"],
            default="refuse",
            help="fit into a run folder that holds another run's checkpoints or logs: refuse "
            "(default; resuming a checkpoint of that folder is always allowed), overwrite, or "
            "new_version (log to the next free version_N below it)",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path: evaluate the student as built "
            "(random weights unless it has a checkpoint:, pretrained: true or a zoo: name)",
        )

        parser.add_argument(
            "--progress",
            type=Literal["auto", "bar", "lines"],
            default="auto",
            help="progress display: 'lines' (plain lines, for job logs), 'bar' (the live rich "
            "bar) or 'auto' (lines when stdout is not a terminal)",
        )
        parser.add_argument(
            "--progress_every_n_steps",
            type=int | None,
            default=None,
            help="with plain-line progress: also a line every N training batches",
        )
        parser.add_argument(
            "--progress_every_minutes",
            type=float | None,
            default=2.0,
            help="with plain-line progress: also a line when this many minutes passed since "
            "the last (0 or null: off)",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with visdistill's progress display, model summary and run summary
        (unless the config turns the first two off or brings its own)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config.get("trainer") or {}
        callbacks = list(kwargs.pop("callbacks", None) or trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(
                make_progress_bar(
                    config.get("progress", "auto"),
                    config.get("progress_every_n_steps"),
                    config.get("progress_every_minutes", 2.0),
                )
            )
        if trainer_cfg.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            callbacks.append(DistillationModelSummary())
        if not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary(report_after_test=bool(config.get("test_after_fit"))))
        if trainer_cfg.get("enable_checkpointing") is False:
            # Lightning refuses checkpoint callbacks with enable_checkpointing: false.
            defaults = self.trainer_defaults.get("callbacks") or []
            self.trainer_defaults["callbacks"] = [
                c for c in defaults if not isinstance(c, ModelCheckpoint)
            ]
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    # The one private LightningCLI method overridden here (Lightning 2.6 has no public switch
    # for it: LightningCLI.__init__ calls it unconditionally after parsing). It would
    # overwrite the model's config with the hyper-parameters of a --ckpt_path FILE (not of
    # `--ckpt_path last`), silently. Here the config is what runs, always: a checkpoint of
    # another student, teachers or terms is refused by DistillationModule's checkpoint
    # check, and changed term settings are warned about. If Lightning renames the method,
    # tests/test_resume.py's changed-config cases fail.
    def _parse_ckpt_path(self) -> None:
        return

    def before_instantiate_classes(self) -> None:
        # Our checkpoints hold only tensors and plain types: never unpickle code on resume.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True

    def before_fit(self) -> None:
        from ..run_folder import prepare_run_folder

        self._resolve_ckpt_path()
        config = self.config[self.subcommand]
        lock = prepare_run_folder(
            self.trainer,
            config.get("run_folder", "refuse"),
            self.config_init["fit"]["ckpt_path"],
            requested=config.get("ckpt_path"),
        )
        if lock is not None:  # released when the fit ends, however it ends
            self.trainer.callbacks.append(lock)
        every = self.config[self.subcommand].get("checkpoint_every_n_steps")
        if every:
            # A second writer of last.ckpt: the epoch-end one stays (same file name).
            self.trainer.callbacks.append(
                ModelCheckpoint(
                    monitor=None,
                    filename="last",
                    every_n_train_steps=every,
                    enable_version_counter=False,
                )
            )

    def _quiet_lightning_results(self) -> None:
        # RunSummary prints the results with teacher names and percentages instead of
        # Lightning's table of raw fractions.
        self.config_init[self.subcommand]["verbose"] = False

    def before_validate(self) -> None:
        self._quiet_lightning_results()
        self._require_trained_student()
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._quiet_lightning_results()
        self._require_trained_student()
        self._resolve_ckpt_path()

    def before_predict(self) -> None:
        self._require_trained_student()
        self._resolve_ckpt_path()

    def _require_trained_student(self) -> None:
        """Evaluating without a checkpoint is evaluating a randomly initialised student,
        which prints plausible-looking metrics: refused unless the student has weights of its
        own or ``--allow_untrained true``."""
        from ..errors import ConfigError

        config = self.config[self.subcommand]
        if config.get("ckpt_path") is not None or config.get("allow_untrained"):
            return
        student = dict(self.model.hparams.get("student") or {})
        name = str(student.get("name", ""))
        if student.get("checkpoint") or student.get("pretrained") or name.startswith("zoo:"):
            return
        raise ConfigError(
            f"`visdistill {self.subcommand}` without --ckpt_path would evaluate the untrained "
            f"student {name} (random weights). Give the trained checkpoint: --ckpt_path "
            "runs/<name>/checkpoints/best.ckpt (or last.ckpt), or pass --allow_untrained true "
            "to evaluate the untrained student on purpose"
        )

    def _resolve_ckpt_path(self) -> None:
        """``last`` -> the run's newest last.ckpt (any logger version); a file -> checked
        first, so a missing, truncated or code-carrying checkpoint is one clear error."""
        from lightning.pytorch.utilities import rank_zero_warn

        from ..resume import check_checkpoint_file, find_last_checkpoint

        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        if path == "last" and self.subcommand == "fit":
            config["ckpt_path"] = find_last_checkpoint(self.trainer)
            if config["ckpt_path"] is None:
                rank_zero_warn(
                    f"--ckpt_path last: no last.ckpt under {self.trainer.default_root_dir}; "
                    "training starts from scratch"
                )
        elif path is not None and path not in ("best", "last", "hpc") and "://" not in path:
            check_checkpoint_file(path)  # from the command line or a config file

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            # The first callback is the best-by-val/acc (or val/loss) one; without validation
            # there is no best checkpoint and the final weights are tested.
            best = self.trainer.checkpoint_callback.best_model_path or None
            self.trainer.test(
                self.model,
                datamodule=self.datamodule,
                ckpt_path=best,
                weights_only=True,
                verbose=False,  # RunSummary prints the results
            )


def lightning_main(args: list[str] | None) -> VisdistillCLI:
    """Run a LightningCLI subcommand; ``args=None`` reads ``sys.argv``."""
    # Two callbacks: Lightning 2.6 writes save_last only on epochs that improve the best
    # checkpoint, but resuming needs the latest epoch every time.
    # ResumableCheckpoint: a resume into a new logger version keeps the run's best.
    # "auto": val/acc (max) when the student's accuracy is measured, else val/loss (min).
    best = ResumableCheckpoint(
        monitor=AUTO_MONITOR, mode="max", filename="best", enable_version_counter=False
    )
    last = ResumableCheckpoint(monitor=None, filename="last", enable_version_counter=False)
    return VisdistillCLI(
        DistillationModule,
        VisionDataModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [best, last, PredictionWriter()]},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str]) -> None:
    """``visdistill fit|validate|test|predict ...``: ``args`` starts with the subcommand."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args are set
    try:
        lightning_main(args)
    finally:
        sys.argv = argv
