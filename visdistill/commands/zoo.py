"""``visdistill zoo list | show | download | verify | evaluate``: each subcommand's options
are the parameters of its function below (jsonargparse subcommands)."""

from __future__ import annotations

import sys
from typing import Literal

from .. import zoo
from ..errors import CheckpointError
from .parsing import add_function, new_parser, parse

TOLERANCE = 0.2  # accuracy points: `evaluate` must reproduce the manifest within this


def _size(entry: zoo.ZooEntry) -> str:
    size = zoo.entry_file_size(entry)
    return f"{size / 2**20:.1f} MB" if size is not None else "-"


def list_entries(kind: Literal["teacher", "student"] | None = None) -> None:
    """List the zoo's entries.

    Args:
        kind: only teachers or only students.
    """
    rows = [("name", "kind", "arch", "dataset", "top-1", "weights", "sha256")]
    for e in zoo.list_entries(kind):
        top1 = e.metrics.get("test_top1")
        rows.append(
            (
                zoo.PREFIX + e.name,
                e.kind,
                e.arch,
                e.dataset or "-",
                f"{top1:.2f}" if top1 is not None else "-",
                _size(e),
                "verified" if e.verified else "UNVERIFIED",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def show(name: str) -> None:
    """Print an entry's manifest.

    Args:
        name: the entry, with or without zoo:.
    """
    e = zoo.get_entry(name)
    print(e.manifest.read_text().rstrip())
    print(f"# manifest: {e.manifest}")
    print(f"# weights on disk: {_size(e)}")


def download(name: str, allow_unverified: bool = False) -> None:
    """Fetch an entry's weights into the cache and verify them.

    Args:
        name: the entry, with or without zoo:.
        allow_unverified: also fetch weights whose manifest publishes no sha256.
    """
    path = zoo.weights_path(zoo.get_entry(name), allow_unverified)
    print(f"{zoo.PREFIX}{_bare(name)}: {path}")


def verify(names: list[str] | None = None) -> None:
    """Check the sha256 of the weights on disk (exit status 1 when one fails).

    Args:
        names: entries to check; default: all.
    """
    entries = [zoo.get_entry(n) for n in names] if names else zoo.list_entries()
    bad = 0
    for e in entries:
        if not e.verified:
            status = "UNVERIFIED (no sha256 in the manifest)"
        elif zoo.entry_file_size(e) is None:
            status = "not downloaded"
        else:
            try:
                zoo.weights_path(e, progress=False)
                status = "ok"
            except CheckpointError as err:
                status, bad = f"FAILED: {err}", bad + 1
        print(f"{zoo.PREFIX}{e.name}: {status}")
    if bad:
        raise SystemExit(1)


def evaluate(name: str, batch_size: int = 256, limit: int | None = None) -> None:
    """Test top-1 on the entry's data set, compared with its manifest (exit status 1 when it
    differs by more than 0.2 points).

    Args:
        name: the entry, with or without zoo:.
        batch_size: images per batch.
        limit: evaluate on this many test images (not compared with the manifest).
    """
    from ..evaluation import evaluate_zoo_model

    e = zoo.get_entry(name)
    acc = evaluate_zoo_model(e.name, batch_size=batch_size, limit=limit)
    expected = e.metrics.get("test_top1")
    line = f"{zoo.PREFIX}{e.name}: test top-1 {acc:.2f} %"
    if expected is None or limit:
        print(line + (" (subset: not compared with the manifest)" if limit else ""))
        return
    delta = acc - expected
    ok = abs(delta) <= TOLERANCE
    print(
        f"{line}, manifest {expected:.2f} %, delta {delta:+.2f}: "
        f"{'reproduced' if ok else f'DIFFERS by more than {TOLERANCE}'}"
    )
    if not ok:
        raise SystemExit(1)


def _bare(name: str) -> str:
    return name[len(zoo.PREFIX) :] if name.startswith(zoo.PREFIX) else name


#: subcommand -> (function, positional parameters)
SUBCOMMANDS = {
    "list": (list_entries, ()),
    "show": (show, ("name",)),
    "download": (download, ("name",)),
    "verify": (verify, ()),
    "evaluate": (evaluate, ("name",)),
}


def build_parser():
    parser = new_parser("visdistill zoo", "The visdistill model zoo (zoo:<name> models).")
    subcommands = parser.add_subcommands(dest="command")
    for name, (function, positional) in SUBCOMMANDS.items():
        summary = " ".join((function.__doc__ or "").split("\n\n")[0].split()).rstrip(".")
        sub = new_parser(f"visdistill zoo {name}", summary)
        if name == "verify":  # any number of names, as positional arguments
            sub.add_argument("names", nargs="*", type=str, help="entries to check; default: all")
        else:
            add_function(sub, function, positional=positional)
        subcommands.add_subcommand(name, sub, help=summary.lower())
    return parser


def main(args: list[str]) -> None:
    ns = parse(build_parser(), args)
    function, _ = SUBCOMMANDS[ns.command]
    options = ns[ns.command].as_dict()
    options.pop("config", None)
    function(**options)
    sys.stdout.flush()
