"""``visdistill convert SRC --out DIR``: an image folder into LitData shards for
:class:`~visdistill.data.ShardsDataModule`; the options are
:func:`~visdistill.data.shards.convert_image_folder`'s parameters."""

from __future__ import annotations

from ..data.shards import MANIFEST, convert_image_folder
from .parsing import add_function, new_parser, parse

DESCRIPTION = (
    "Convert an image folder (class sub-folders, or a flat folder without labels) into "
    "streaming shards (LitData) that store each image's file bytes; resumable: run the same "
    "command again after an interruption."
)


def build_parser():
    parser = new_parser("visdistill convert", DESCRIPTION)
    add_function(parser, convert_image_folder, skip={"out"}, positional=("src",))
    # `--out`, as `visdistill export` and `cache` spell their destination.
    parser.add_argument("--out", type=str, required=True, help="the shards folder (created)")
    return parser


def main(args: list[str]) -> None:
    config = parse(build_parser(), args).as_dict()
    config.pop("config", None)
    out = config.pop("out")
    manifest = convert_image_folder(out=out, **config)
    labels = f"{len(manifest['classes'])} classes" if manifest.get("classes") else "no labels"
    print(
        f"converted {manifest['num_samples']} images ({labels}) into {out}; its manifest is "
        f"{out}/{MANIFEST}. Train with data: class_path: visdistill.ShardsDataModule, "
        f"init_args: {{train_dir: {out}}}"
    )
