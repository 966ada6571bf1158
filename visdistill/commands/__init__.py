"""Every ``visdistill`` subcommand, one module each, one parser style (jsonargparse).

``fit | validate | test | predict`` are LightningCLI (:mod:`.lightning`); the others parse
their options from the signature of the library function they call (:mod:`.parsing`), so
every subcommand takes ``--config FILE`` and ``--print_config``. :data:`COMMANDS` is the one
table of subcommands: ``visdistill --help`` prints it, :func:`main` dispatches on it.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from ..errors import VisdistillError
from ..quiet import quiet_dependencies

#: subcommand -> (module under visdistill.commands, one-line summary for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("lightning", "train (LightningCLI): visdistill fit --config configs/quickstart.yaml"),
    "validate": ("lightning", "evaluate on the validation split (LightningCLI)"),
    "test": ("lightning", "evaluate on the test split (LightningCLI)"),
    "predict": ("lightning", "run the student on the test split, write predictions.csv"),
    "cache": ("cache", "precompute teacher soft targets for replayed augmentations (FKD-style)"),
    "export": ("export", "write a fit checkpoint's student as a plain timm model"),
    "convert": ("convert", "an image folder into streaming shards (LitData) for ShardsDataModule"),
    "probe": ("probe", "kNN and linear-probe top-1 of an exported student on labelled data"),
    "cka": ("cka", "CKA heat map between the stages of two models (PNG + JSON/CSV)"),
    "zoo": ("zoo", "list | show | download | verify | evaluate the model zoo (zoo:<name>)"),
    "search": ("search", "training-free student search (DisWOT): rank timm students"),
    "mmdet": ("mmdet", "train | test | convert mmdet detectors (needs the mmdet extra)"),
}


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: visdistill <command> [options]\n\n"
        "Distil timm teachers into a timm student.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "`visdistill <command> --help` for a command's options; every command takes "
        "--config FILE (YAML) and --print_config.\n"
    )


def main(argv: list[str] | None = None) -> None:
    """The ``visdistill`` entry point; ``argv=None`` reads ``sys.argv``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(help_text())
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"visdistill: unknown command {command!r}.{hint}\n\n{help_text()}", file=sys.stderr)
        raise SystemExit(2)
    with quiet_dependencies():
        try:
            name = COMMANDS[command][0]
            module = importlib.import_module(f"{__name__}.{name}")
            # LightningCLI parses its subcommand itself; the others get their options only.
            module.main(args if name == "lightning" else rest)
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
