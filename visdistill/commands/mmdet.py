"""``visdistill mmdet train | test | convert`` (also ``python -m visdistill.integrations.mmdet``):
mmengine's Runner on an mmdet config, and checkpoint conversion for torch >= 2.6.

    visdistill mmdet train configs/mmdet/retinanet_r18_mosaic_distill_cwd.py
    visdistill mmdet test CONFIG work_dirs/.../student.safetensors
    visdistill mmdet convert work_dirs/x/epoch_12.pth teacher.safetensors --trusted

Needs the mmdet extra (``bash scripts/install_mmdet.sh``); nothing is imported from mmdet
until a subcommand runs.
"""

from __future__ import annotations

import inspect
import json
import sys

from .parsing import add_function, new_parser, parse


def train(
    config_file: str, work_dir: str | None = None, cfg_options: list[str] | None = None
) -> None:
    """Train a config with mmengine's Runner; prints the last validation metrics.

    Args:
        config_file: an mmdet config file (.py).
        work_dir: output folder; default: the config's work_dir, else work_dirs/<config name>.
        cfg_options: KEY=VALUE overrides of the config (mmengine's syntax).
    """
    import visdistill.integrations.mmdet  # noqa: F401  (registers the modules)
    from visdistill.integrations.mmdet import runner

    _print_metrics(runner.train(runner.load_config(config_file, work_dir, cfg_options)))


def test(
    config_file: str,
    checkpoint: str,
    work_dir: str | None = None,
    cfg_options: list[str] | None = None,
    trusted: bool = False,
    prefix: str = "",
) -> None:
    """Evaluate a checkpoint on the config's test set; prints the metrics.

    Args:
        config_file: an mmdet config file (.py).
        checkpoint: weights (.safetensors, a state dict, or a Runner checkpoint with trusted).
        work_dir: output folder; default: the config's work_dir, else work_dirs/<config name>.
        cfg_options: KEY=VALUE overrides of the config (mmengine's syntax).
        trusted: unpickle a Runner checkpoint (trusted files only).
        prefix: load only keys with this prefix, e.g. 'student.'.
    """
    import visdistill.integrations.mmdet  # noqa: F401  (registers the modules)
    from visdistill.integrations.mmdet import runner

    cfg = runner.load_config(config_file, work_dir, cfg_options)
    _print_metrics(runner.test(cfg, checkpoint, trusted=trusted, prefix=prefix))


def convert(src: str, dst: str, trusted: bool = False, prefix: str = "") -> None:
    """Write a checkpoint's weights as safetensors (loads weights-only).

    Args:
        src: the checkpoint to read.
        dst: the file to write (.safetensors, or .pth for a torch state dict).
        trusted: unpickle a Runner checkpoint (trusted files only).
        prefix: keep only keys with this prefix, stripped ('student.').
    """
    from visdistill.integrations.mmdet.checkpoints import convert_checkpoint

    print(convert_checkpoint(src, dst, trusted=trusted, prefix=prefix))


def _print_metrics(metrics: dict) -> None:
    print(json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))


#: subcommand -> (function, positional parameters)
SUBCOMMANDS = {
    "train": (train, ("config_file",)),
    "test": (test, ("config_file", "checkpoint")),
    "convert": (convert, ("src", "dst")),
}


def build_parser(prog: str = "visdistill mmdet"):
    parser = new_parser(prog, "mmengine's Runner on an mmdet config, and checkpoint conversion.")
    subcommands = parser.add_subcommands(dest="command")
    for name, (function, positional) in SUBCOMMANDS.items():
        summary = " ".join((function.__doc__ or "").split("\n\n")[0].split()).rstrip(".")
        sub = new_parser(f"{prog} {name}", summary)
        add_function(sub, function, positional=positional, skip={"cfg_options"})
        if "cfg_options" in inspect.signature(function).parameters:
            # KEY=VALUE ... as mmengine's tools take them (several values after one option).
            sub.add_argument(
                "--cfg_options",
                nargs="+",
                type=str,
                default=None,
                metavar="KEY=VALUE",
                help="overrides of the config (mmengine's syntax)",
            )
        subcommands.add_subcommand(name, sub, help=summary.lower())
    return parser


def main(args: list[str], prog: str = "visdistill mmdet") -> None:
    ns = parse(build_parser(prog), args)
    function, _ = SUBCOMMANDS[ns.command]
    options = ns[ns.command].as_dict()
    options.pop("config", None)
    function(**options)
    sys.stdout.flush()
