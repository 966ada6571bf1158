"""``python -m visdistill.integrations.mmdet {train,test,convert}``: the same command as
``visdistill mmdet`` (see :mod:`visdistill.commands.mmdet`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``visdistill mmdet`` with ``argv``; returns the exit status (a visdistill error is
    one line on stderr and status 1)."""
    from ...commands import main as visdistill_main

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        visdistill_main(["mmdet", *args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
