"""``python -m visdistill.cli`` and ``from visdistill.cli import main``, kept for scripts
written before the commands moved to :mod:`visdistill.commands` (one module per
subcommand); new code imports from there."""

from __future__ import annotations

from .commands import error_message, main, visdistill_error_in
from .commands.lightning import VisdistillCLI, lightning_main

__all__ = ["VisdistillCLI", "error_message", "lightning_main", "main", "visdistill_error_in"]

if __name__ == "__main__":
    main()
