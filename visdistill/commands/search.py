"""``visdistill search``: DisWOT student search; the options are
:func:`~visdistill.search.run.run_search`'s parameters."""

from __future__ import annotations

import shlex

from ..search.run import run_search
from .parsing import add_function, new_parser, parse

DESCRIPTION = (
    "Training-free student search (DisWOT, CVPR 2023): score candidate timm students against a "
    "teacher at random initialisation (semantic + relation similarity; higher = better), rank "
    "them, and write a `visdistill fit` config for the best."
)


def build_parser():
    parser = new_parser("visdistill search", DESCRIPTION)
    add_function(parser, run_search, skip={"command_line"})
    return parser


def main(args: list[str]) -> None:
    config = parse(build_parser(), args).as_dict()
    config.pop("config", None)
    run_search(**config, command_line=shlex.join(["visdistill", "search", *args]))
