"""The ``visdistill`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (typed YAML with
``class_path``/``init_args``, ``--print_config``); ``export`` writes a trained student
as a plain timm model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI

from .callbacks import PredictionWriter
from .checkpoints import AUTO_MONITOR, ResumableCheckpoint
from .data.base import VisionDataModule
from .errors import VisdistillError
from .module import DistillationModule
from .progress import make_progress_bar
from .quiet import quiet_dependencies
from .summary import DistillationModelSummary, RunSummary

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
HELP = """usage: visdistill <command> [options]

Distil timm teachers into a timm student.

commands:
  fit        train (LightningCLI): visdistill fit --config configs/quickstart.yaml
  validate   evaluate on the validation split (LightningCLI)
  test       evaluate on the test split (LightningCLI)
  predict    run the student on the test split, write predictions.csv (LightningCLI)
  cache      precompute teacher soft targets for replayed augmentations (FKD-style)
  export     write a fit checkpoint's student as a plain timm model (safetensors + config.json)
  cka        CKA heat map between the stages of two models (PNG + JSON/CSV)
  zoo        list | show | download | verify | evaluate the model zoo (zoo:<name> models)
  search     training-free student search (DisWOT): rank timm students for a teacher

`visdistill <command> --help` for a command's options.
"""


class VisdistillCLI(LightningCLI):
    """LightningCLI with visdistill's defaults: best/last checkpoints, optional test after fit."""

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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the model's config with the hyper-parameters of a
        # --ckpt_path FILE (not of `--ckpt_path last`), silently. Here the config is what
        # runs, always: a checkpoint of another student, teachers or terms is refused by
        # DistillationModule's checkpoint check, and changed term settings are warned about.
        return

    def before_instantiate_classes(self) -> None:
        # Our checkpoints hold only tensors and plain types: never unpickle code on resume.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True

    def before_fit(self) -> None:
        from .run_folder import prepare_run_folder

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
        from .errors import ConfigError

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

        from .resume import check_checkpoint_file, find_last_checkpoint

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


def cache_main(args: list[str]) -> None:
    from .teacher_cache import build_teacher_cache, check_cache_destination

    parser = argparse.ArgumentParser(
        prog="visdistill cache",
        description="Precompute the teachers' soft targets for E epochs of replayed "
        "augmentations; then train with --model.teacher_cache DIR. Other options are the fit "
        "config's (--config C.yaml, --data.init_args.train_subset ...).",
    )
    parser.add_argument(
        "--out", required=True, help="cache directory: new, empty, or a cache with --overwrite"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the teacher cache already in --out (only the cache's own files)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: trainer.max_epochs")
    parser.add_argument("--top-k", type=int, default=10, help="classes kept per sample")
    parser.add_argument("--pooled", action="store_true", help="also store pooled features")
    parser.add_argument("--batch-size", type=int, default=256)
    ns, rest = parser.parse_known_args(args)
    check_cache_destination(Path(ns.out), ns.overwrite)  # before building anything
    check_config_files(rest)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args are set
    try:
        cli = VisdistillCLI(
            DistillationModule,
            VisionDataModule,
            subclass_mode_data=True,
            run=False,
            args=rest,
            save_config_callback=None,
        )
    finally:
        sys.argv = argv
    cli.datamodule.setup("fit")
    epochs = ns.epochs or cli.trainer.max_epochs or 1
    out = build_teacher_cache(
        cli.model,
        cli.datamodule,
        ns.out,
        epochs,
        ns.top_k,
        ns.pooled,
        ns.batch_size,
        overwrite=ns.overwrite,
    )
    print(f"teacher cache written to {out}; train with --model.teacher_cache {out}")


def export_main(args: list[str]) -> None:
    from .export import export_student

    parser = argparse.ArgumentParser(
        prog="visdistill export",
        description="Export the student of a `visdistill fit` checkpoint as a timm model folder "
        "(model.safetensors + config.json), loadable with "
        "timm.create_model('local-dir:<out>', pretrained=True).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `visdistill fit`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--input-size", type=int, default=None, help="input side to record")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (replaces its model.safetensors and config.json)",
    )
    ns = parser.parse_args(args)
    out = export_student(
        ns.checkpoint, ns.out, dtype=ns.dtype, input_size=ns.input_size, overwrite=ns.overwrite
    )
    print(f"exported student to {out}/model.safetensors and {out}/config.json")


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that refuses a mapping holding the same key twice (PyYAML and
    jsonargparse keep the last one silently: a pasted ``lr`` line overrides the first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base": keys given next to it override the base's
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"duplicate key {key!r} (first at line {first[key]})",
                            key_node.start_mark,
                        )
                except TypeError:  # an unhashable key: the base class reports it
                    break
                first[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def check_config_files(args: list[str]) -> None:
    """Read every ``--config``/``-c`` YAML file first, so a missing or malformed file is one
    line naming the file (jsonargparse reports ``<unicode string>`` after its usage text)."""
    import yaml

    from .errors import ConfigError

    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if value.lstrip().startswith(("{", "[")) or "\n" in value:
            continue  # an inline YAML string, parsed by jsonargparse
        if not path.is_file():
            raise ConfigError(f"config file not found: {value} (resolved: {path.resolve()})")
        try:
            yaml.load(path.read_text(), Loader=_unique_key_loader())  # noqa: S506 (SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{value}:{where}: invalid YAML: {problem}") from None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        return
    command, rest = args[0], args[1:]
    with quiet_dependencies():
        _run_command(command, rest, None if argv is None else args)


def _run_command(command: str, rest: list[str], args: list[str] | None) -> None:
    try:
        if command in LIGHTNING_COMMANDS:
            check_config_files(rest)
            lightning_main(args)
        elif command == "export":
            export_main(rest)
        elif command == "cache":
            cache_main(rest)
        elif command == "cka":
            from .diagnostics.cli import cka_main

            cka_main(rest)
        elif command == "zoo":
            from .zoo_cli import zoo_main

            zoo_main(rest)
        elif command == "search":
            from .search.cli import search_main

            search_main(rest)
        else:
            print(f"visdistill: unknown command {command!r}\n\n{HELP}", file=sys.stderr)
            raise SystemExit(2)
    except Exception as e:
        # Our errors already say what is wrong and how to fix it: no traceback needed.
        error = visdistill_error_in(e)
        if error is None:
            raise
        print(f"visdistill {command}: error: {error_message(error)}", file=sys.stderr)
        raise SystemExit(1) from None


def visdistill_error_in(exc: BaseException) -> VisdistillError | None:
    """``exc`` if it is a :class:`VisdistillError`, else the first one it was raised from
    (its ``__cause__``/``__context__`` chain), else ``None``. jsonargparse wraps an error
    raised while it instantiates a class (a data module's ``batch_size`` check, a term's
    temperature check) in 70 lines of "does not validate against any of the Union subtypes"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, VisdistillError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def error_message(error: VisdistillError) -> str:
    """The message of ``error`` alone. An error raised in a DataLoader worker process
    (``num_workers > 0``) comes back re-raised by torch with the worker's whole traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ...");
    the user gets the original message, as with ``num_workers: 0``."""
    text = str(error)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    kind = type(error)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind("\n" + prefix)
        if at >= 0:
            return text[at + 1 + len(prefix) :].strip() + " (in a data-loader worker)"
    return text


if __name__ == "__main__":
    main()
