"""``visdistill cka``: a CKA heat map between the stages of two models; the options are
:func:`~visdistill.diagnostics.compare.compare_models`'s parameters."""

from __future__ import annotations

from ..diagnostics.compare import compare_models
from .parsing import add_function, new_parser, parse

DESCRIPTION = (
    "Linear CKA (minibatch, unbiased HSIC_1) between the stages of two models; writes a PNG "
    "heat map and optionally the matrix."
)


def build_parser():
    parser = new_parser("visdistill cka", DESCRIPTION)
    add_function(parser, compare_models)
    return parser


def main(args: list[str]) -> None:
    config = parse(build_parser(), args).as_dict()
    config.pop("config", None)
    compare_models(**config)
