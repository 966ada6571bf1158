"""``visdistill export CHECKPOINT --out DIR``: the options are
:func:`~visdistill.export.export_student`'s keyword parameters (a new one is a new option)."""

from __future__ import annotations

from ..export import WEIGHTS_FILE, export_student
from .parsing import add_function, new_parser, parse

DESCRIPTION = (
    "Export the student of a `visdistill fit` checkpoint as a plain model folder; by default "
    "timm's (model.safetensors + config.json), loadable with "
    "timm.create_model('local-dir:<out>', pretrained=True)."
)


def build_parser():
    parser = new_parser("visdistill export", DESCRIPTION)
    add_function(parser, export_student, skip={"out_dir"}, positional=("checkpoint",))
    # `--out`, as the command always spelled it, for export_student's out_dir.
    parser.add_argument("--out", type=str, required=True, help="output folder (created)")
    return parser


def main(args: list[str]) -> None:
    config = parse(build_parser(), args).as_dict()
    config.pop("config", None)
    out = export_student(out_dir=config.pop("out"), **config)
    weights = WEIGHTS_FILE[config.get("format") or "timm"]
    print(f"exported student to {out}/{weights} and {out}/config.json")
    if config.get("with_adaptors"):
        from ..agglomerative_student import ADAPTOR_FILES

        files = ADAPTOR_FILES[config.get("format") or "timm"]
        print(f"with its adaptor heads: {' and '.join(f'{out}/{n}' for n in files)}")
