"""``python -m visdistill``: the ``visdistill`` command."""

from .commands import main

main()
