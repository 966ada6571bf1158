"""``visdistill zoo list | show | download | verify | evaluate``."""

from __future__ import annotations

import argparse
import sys

from . import zoo
from .errors import CheckpointError

TOLERANCE = 0.2  # accuracy points: `evaluate` must reproduce the manifest within this


def _size(entry: zoo.ZooEntry) -> str:
    size = zoo.entry_file_size(entry)
    return f"{size / 2**20:.1f} MB" if size is not None else "-"


def _list(ns: argparse.Namespace) -> None:
    rows = [("name", "kind", "arch", "dataset", "top-1", "weights", "sha256")]
    for e in zoo.list_entries(ns.kind):
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


def _show(ns: argparse.Namespace) -> None:
    e = zoo.get_entry(ns.name)
    print(e.manifest.read_text().rstrip())
    print(f"# manifest: {e.manifest}")
    print(f"# weights on disk: {_size(e)}")


def _download(ns: argparse.Namespace) -> None:
    path = zoo.weights_path(zoo.get_entry(ns.name), ns.allow_unverified)
    print(f"{zoo.PREFIX}{ns.name}: {path}")


def _verify(ns: argparse.Namespace) -> None:
    entries = [zoo.get_entry(n) for n in ns.names] if ns.names else zoo.list_entries()
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


def _evaluate(ns: argparse.Namespace) -> None:
    e = zoo.get_entry(ns.name)
    acc = zoo.evaluate(e.name, batch_size=ns.batch_size, limit=ns.limit)
    expected = e.metrics.get("test_top1")
    line = f"{zoo.PREFIX}{e.name}: test top-1 {acc:.2f} %"
    if expected is None or ns.limit:
        print(line + (" (subset: not compared with the manifest)" if ns.limit else ""))
        return
    delta = acc - expected
    ok = abs(delta) <= TOLERANCE
    print(
        f"{line}, manifest {expected:.2f} %, delta {delta:+.2f}: "
        f"{'reproduced' if ok else f'DIFFERS by more than {TOLERANCE}'}"
    )
    if not ok:
        raise SystemExit(1)


def zoo_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="visdistill zoo", description="The visdistill model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list entries")
    p.add_argument("--kind", choices=zoo.KINDS)
    p.set_defaults(func=_list)
    p = sub.add_parser("show", help="print an entry's manifest")
    p.add_argument("name")
    p.set_defaults(func=_show)
    p = sub.add_parser("download", help="fetch an entry's weights into the cache and verify them")
    p.add_argument("name")
    p.add_argument("--allow-unverified", action="store_true")
    p.set_defaults(func=_download)
    p = sub.add_parser("verify", help="check the sha256 of weights on disk")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=_verify)
    p = sub.add_parser("evaluate", help="test top-1 on the entry's data set vs its manifest")
    p.add_argument("name")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="evaluate on this many test images")
    p.set_defaults(func=_evaluate)
    ns = parser.parse_args(args)
    ns.name = getattr(ns, "name", None)
    if ns.name and ns.name.startswith(zoo.PREFIX):
        ns.name = ns.name[len(zoo.PREFIX) :]
    ns.func(ns)
    sys.stdout.flush()
