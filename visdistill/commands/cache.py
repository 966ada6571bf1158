"""``visdistill cache``: precompute the teachers' outputs for replayed augmentations.

The options are :func:`~visdistill.teacher_cache.build_teacher_cache`'s, next to the fit
config's own (``--config C.yaml``, ``--model.*``, ``--data.*``, ``--trainer.*``), all in one
LightningCLI parser: a cache config file may hold both. Under ``torchrun`` (``WORLD_SIZE``
> 1) every process builds its share of the cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.base import VisionDataModule
from ..module import DistillationModule
from ..teacher_cache import build_teacher_cache, check_cache_destination
from .lightning import VisdistillCLI
from .parsing import accept_legacy_spelling, add_function

DESCRIPTION = (
    "Precompute the teachers' soft targets (and features) for E epochs of replayed "
    "augmentations; then train "
    "with --model.teacher_cache DIR. Other options are the fit config's (--config C.yaml, "
    "--data.init_args.train_subset ...)."
)
#: build_teacher_cache's arguments that are not options: built from the config, or fixed.
_NOT_OPTIONS = {"module", "datamodule", "progress", "epochs"}


class CacheCLI(VisdistillCLI):
    """The fit config's parser plus the cache's options; builds the model and data only."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        self.cache_options = add_function(parser, build_teacher_cache, skip=_NOT_OPTIONS)
        parser.add_argument(
            "--epochs",
            type=int | None,
            default=None,
            help="epochs of augmentations to store; default: trainer.max_epochs",
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, accept_legacy_spelling(parser, list(args or [])))

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        check_cache_destination(Path(self.config["out"]), self.config["overwrite"])
        # The model's teacher_cache is what this command builds, not something to read.
        self.config["model.teacher_cache"] = None


def main(args: list[str]) -> None:
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args are set
    try:
        cli = CacheCLI(
            DistillationModule,
            VisionDataModule,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_callback=None,
            parser_kwargs={"prog": "visdistill cache", "description": DESCRIPTION},
        )
    finally:
        sys.argv = argv
    cli.datamodule.setup("fit")
    options = {name: cli.config[name] for name in cli.cache_options}
    if options.get("train_world_size") is None:
        options["train_world_size"] = cli.trainer.world_size
    _init_distributed()
    out = build_teacher_cache(
        cli.model,
        cli.datamodule,
        epochs=cli.config["epochs"] or cli.trainer.max_epochs or 1,
        **options,
    )
    print(f"teacher cache written to {out}; train with --model.teacher_cache {out}")


def _init_distributed() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): NCCL on GPUs,
    gloo otherwise."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
