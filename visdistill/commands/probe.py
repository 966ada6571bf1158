"""``visdistill probe EXPORT_DIR --data DATA``: kNN and linear-probe top-1 of an exported
student; the options are :func:`~visdistill.probes.probe_exported`'s parameters (a new one
is a new option), plus ``--json FILE``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoints import atomic_write, check_writable
from ..data.base import VisionDataModule
from ..data.by_name import datamodule_by_name
from ..probes import WEIGHT_DECAYS, probe_exported
from .parsing import add_function, new_parser, parse

DESCRIPTION = (
    "kNN (k=20, T=0.07 by default) and linear-probe top-1 of a `visdistill export` folder's "
    "frozen features on a labelled data set: its training split is the reference set, its test "
    "split (or --split val) is classified."
)


def build_parser():
    parser = new_parser("visdistill probe", DESCRIPTION)
    add_function(parser, probe_exported, skip={"data"}, positional=("export_dir",))
    # A list, as YAML (and so --print_config then --config) gives it back.
    parser.set_defaults(weight_decays=list(WEIGHT_DECAYS))
    parser.add_argument(
        "--data",
        type=VisionDataModule | str,
        default="fashion_mnist",
        help="labelled data: digits, fashion_mnist, an image folder with class sub-folders, or "
        "a data module (class_path/init_args, e.g. in a --config file); read with labels on "
        "and augmentation off",
    )
    parser.add_argument(
        "--json", type=str | None, default=None, help="also write the result to this JSON file"
    )
    return parser


def _data(value: Any) -> VisionDataModule:
    """The data module of ``--data``: a name, or the class_path/init_args instance."""
    return datamodule_by_name(value) if isinstance(value, str) else value


def format_result(result: dict[str, Any]) -> str:
    """The printed lines: top-1 in percent, then what was measured on what."""
    lines = [
        f"kNN top-1 (k={result['k']}, T={result['temperature']:g}): {100 * result['knn_top1']:.2f} %"
    ]
    if "linear_top1" in result:
        lines.append(
            f"linear-probe top-1: {100 * result['linear_top1']:.2f} % "
            f"(weight decay {result['linear_weight_decay']:g})"
        )
    lines.append(
        f"{result['num_eval']} {result['split']} images against {result['num_train']} training "
        f"images, {result['num_classes']} classes, {result['feature_dim']}-dim features"
    )
    return "\n".join(lines)


def main(args: list[str]) -> None:
    parser = build_parser()
    namespace = parse(parser, args)
    options = namespace.as_dict()
    options.pop("config", None)
    json_file = options.pop("json")
    options.pop("data")
    json_path = check_writable(json_file, "probe result") if json_file else None  # before the work
    data = _data(parser.instantiate(namespace).data)
    result = probe_exported(data=data, **options)
    print(format_result(result))
    if json_path is not None:
        export_dir = str(Path(options["export_dir"]).resolve())
        text = json.dumps({"export_dir": export_dir, **result}, indent=1)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n"))
        print(f"wrote {json_path}")
