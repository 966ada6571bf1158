"""The model zoo: YAML manifests in ``teachers/`` and ``students/``, verified weights.

A manifest names one model::

    name: fmnist_resnet10t                 # used as ``zoo:fmnist_resnet10t``
    kind: teacher                          # or student
    arch: resnet10t                        # timm architecture
    model_kwargs: {}                       # extra timm.create_model kwargs
    num_classes: 10
    input: {size: 32, mean: [...], std: [...], interpolation: bicubic}
    dataset: fashion_mnist                 # what ``visdistill zoo evaluate`` runs on
                                           # (see visdistill.evaluation)
    metrics: {test_top1: 90.14}            # measured by ``visdistill zoo evaluate``
    recipe: configs/teachers/fmnist_resnet10t.yaml
    weights:
      file: weights/fmnist_resnet10t/model.safetensors   # relative to the manifest, or
      url: https://...                                    # downloaded to the cache, or
      package: {module: ..., path: ..., pip: ...}         # a file inside a pip package
      sha256: 7fc2...                      # checked before every load; null = unverified
      key_map: none                        # or "ordered" (tensors in order onto timm's keys)
    license: apache-2.0

Manifests are found, first match wins, in ``$VISDISTILL_ZOO`` (``os.pathsep``-separated
folders), the installed wheel (``visdistill/_zoo/``) and a source checkout
(``teachers/``, ``students/``). Downloads go to ``$VISDISTILL_CACHE/zoo`` (default
``~/.cache/visdistill/zoo``) with a progress bar; weights load only from safetensors or
``torch.load(weights_only=True)``, and only after their sha256 matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .checkpoints import load_state_dict_file, load_weights_into
from .errors import CheckpointError, ConfigError, UnknownModelError, close_matches

PREFIX = "zoo:"
KINDS = ("teacher", "student")
KEY_MAPS = ("none", "ordered")
_PACKAGE_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooWeights:
    """Where an entry's weights live and how to check and map them."""

    file: str | None = None
    url: str | None = None
    package: dict[str, str] | None = None
    sha256: str | None = None
    key_map: str = "none"


@dataclass(frozen=True)
class ZooEntry:
    """One manifest (see the module docstring for the fields)."""

    name: str
    kind: str
    arch: str
    num_classes: int
    weights: ZooWeights
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    recipe: str | None = None
    license: str | None = None
    description: str | None = None
    source: str | None = None
    manifest: Path | None = None

    @property
    def verified(self) -> bool:
        return bool(self.weights.sha256)


# ---------------------------------------------------------------------------- manifests
def zoo_dirs() -> list[Path]:
    """Folders searched for manifests, in priority order."""
    dirs: list[Path] = []
    for extra in filter(None, os.environ.get("VISDISTILL_ZOO", "").split(os.pathsep)):
        dirs.append(Path(extra).expanduser())
    for root in (_PACKAGE_ROOT / "_zoo", _PACKAGE_ROOT.parent):
        dirs += [root / "teachers", root / "students"]
    return [d for d in dirs if d.is_dir()]


def load_manifest(path: str | os.PathLike) -> ZooEntry:
    """Parse and validate one manifest file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"zoo manifest {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"zoo manifest {path} must be a mapping of fields")
    known = {f.name for f in fields(ZooEntry)} - {"manifest"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"zoo manifest {path}: unknown field(s) {unknown}; known: {sorted(known)}"
        )
    missing = [k for k in ("name", "kind", "arch", "num_classes", "weights") if k not in data]
    if missing:
        raise ConfigError(f"zoo manifest {path} lacks required field(s) {missing}")
    if data["kind"] not in KINDS:
        raise ConfigError(f"zoo manifest {path}: kind must be one of {KINDS}, got {data['kind']!r}")
    w = data["weights"]
    wknown = {f.name for f in fields(ZooWeights)}
    if not isinstance(w, dict) or set(w) - wknown:
        raise ConfigError(f"zoo manifest {path}: weights must be a mapping with keys {wknown}")
    sha = w.get("sha256")
    if sha is not None and not (
        isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)
    ):
        raise ConfigError(
            f"zoo manifest {path}: weights.sha256 must be a 64-character hex string (quote it "
            f"in YAML) or null, got {sha!r}"
        )
    weights = ZooWeights(**w)
    sources = [s for s in (weights.file, weights.url, weights.package) if s]
    if len(sources) != 1:
        raise ConfigError(f"zoo manifest {path}: weights need exactly one of file, url or package")
    if weights.key_map not in KEY_MAPS:
        raise ConfigError(f"zoo manifest {path}: key_map must be one of {KEY_MAPS}")
    return ZooEntry(**{**data, "weights": weights, "manifest": path.resolve()})


def list_entries(kind: str | None = None) -> list[ZooEntry]:
    """Every manifest found (first occurrence of each name), sorted by name."""
    entries: dict[str, ZooEntry] = {}
    for d in zoo_dirs():
        for path in sorted(d.glob("*.yaml")):
            entry = load_manifest(path)
            entries.setdefault(entry.name, entry)
    return sorted(
        (e for e in entries.values() if kind is None or e.kind == kind), key=lambda e: e.name
    )


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name`` (with or without ``zoo:``); close matches if unknown."""
    bare = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    entries = {e.name: e for e in list_entries()}
    if bare in entries:
        return entries[bare]
    hints = close_matches(bare, entries)
    hint = f" Did you mean: {', '.join(PREFIX + h for h in hints)}?" if hints else ""
    raise UnknownModelError(
        f"unknown zoo model {PREFIX}{bare}.{hint} `visdistill zoo list` shows all "
        f"{len(entries)} entries."
    )


# ---------------------------------------------------------------------------- weights
def cache_dir() -> Path:
    root = os.environ.get("VISDISTILL_CACHE") or "~/.cache/visdistill"
    return Path(root).expanduser() / "zoo"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_hash(entry: ZooEntry, path: Path, allow_unverified: bool) -> None:
    expected = entry.weights.sha256
    if not expected:
        if not allow_unverified:
            raise CheckpointError(
                f"zoo entry {entry.name} has no published sha256, so its weights cannot be "
                "verified; load it anyway with allow_unverified=True (CLI: --allow_unverified true)"
            )
        return
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"sha256 mismatch for {entry.name} weights {path}: expected {expected}, got "
            f"{actual}. The file is corrupt or was tampered with; delete it (downloads are "
            "fetched again) or fix the manifest"
        )


def _local_file(entry: ZooEntry) -> Path:
    base = entry.manifest.parent
    rel = Path(entry.weights.file)
    target = (base / rel).resolve()
    if rel.is_absolute() or not target.is_relative_to(base):
        raise CheckpointError(
            f"zoo manifest {entry.manifest}: weights file {entry.weights.file!r} points outside "
            f"the manifest's folder {base}; only relative paths inside it are allowed"
        )
    return target


def _package_file(entry: ZooEntry) -> Path:
    pkg = entry.weights.package
    module, rel = pkg.get("module", ""), pkg.get("path", "")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"zoo entry {entry.name} takes its weights from the Python package {module!r}, which "
            f"is not installed: pip install {pkg.get('pip', module)}"
        )
    base = Path(next(iter(spec.submodule_search_locations))).resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise CheckpointError(f"zoo entry {entry.name}: package path {rel!r} leaves {base}")
    return target


def _download_target(entry: ZooEntry) -> Path:
    name = Path(urllib.parse.urlparse(entry.weights.url).path).name
    if not name or name in (".", ".."):
        raise CheckpointError(
            f"zoo entry {entry.name}: cannot name a file after {entry.weights.url}"
        )
    return cache_dir() / entry.name / name


# Seconds a download may wait for the server (to connect, or for its next bytes) before it
# fails; a slow but moving download is not limited.
DOWNLOAD_TIMEOUT_ENV = "VISDISTILL_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 60.0


@contextlib.contextmanager
def _stall_timeout(seconds: float) -> Iterator[None]:
    """torch's downloader opens its connection without a timeout, so a server that stops
    answering hangs it for ever; the socket default applies to that connection. It is
    process-wide, hence set only for the download and restored after."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_timeout() -> float:
    """The stall timeout of zoo downloads: ``$VISDISTILL_DOWNLOAD_TIMEOUT`` seconds, default 60."""
    raw = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_DOWNLOAD_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{DOWNLOAD_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def _download(entry: ZooEntry, dest: Path, progress: bool) -> None:
    """Fetch ``entry``'s URL to ``dest`` with torch's downloader: it writes a temporary file
    beside ``dest`` and moves it into place only after the sha256 matched (a bad download is
    never placed; without a published sha256 the caller allowed unverified weights). A server
    silent for :func:`download_timeout` seconds fails the download."""
    url, expected = entry.weights.url, entry.weights.sha256
    dest.parent.mkdir(parents=True, exist_ok=True)
    timeout = download_timeout()
    try:
        with _stall_timeout(timeout):
            torch.hub.download_url_to_file(
                url,
                str(dest),
                hash_prefix=expected.lower() if expected else None,
                progress=progress,
            )
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise CheckpointError(
            f"sha256 mismatch for {entry.name} weights downloaded from {url} ({e}); the file "
            "was not kept. The download is corrupt or was tampered with, or the manifest's "
            "sha256 is wrong"
        ) from None
    except OSError as e:
        if not isinstance(e, TimeoutError) and not isinstance(
            getattr(e, "reason", None), TimeoutError
        ):
            raise CheckpointError(f"could not download {url}: {e}") from e
        raise CheckpointError(
            f"could not download {url}: the server sent nothing for {timeout:g} s ({e}); "
            f"try again later, or allow longer with {DOWNLOAD_TIMEOUT_ENV}=<seconds>"
        ) from e


def weights_path(
    entry: ZooEntry | str, allow_unverified: bool = False, progress: bool = True
) -> Path:
    """Local path of an entry's weights (downloaded into the cache if needed), verified."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    w = entry.weights
    if w.file:
        path = _local_file(entry)
    elif w.package:
        path = _package_file(entry)
    else:
        path = _download_target(entry)
        if not path.is_file():
            if not w.sha256 and not allow_unverified:
                _check_hash(entry, path, allow_unverified)  # refuse before downloading
            _download(entry, path, progress)  # verified while downloading
            return path
    if not path.is_file():
        raise CheckpointError(f"zoo entry {entry.name}: weights file not found: {path}")
    _check_hash(entry, path, allow_unverified)
    return path


def load_entry_weights(
    model: nn.Module, entry: ZooEntry, allow_unverified: bool = False, progress: bool = True
) -> None:
    """Load an entry's verified weights into a timm ``model`` built from ``entry.arch``.

    When the model's ``num_classes`` differs from the entry's, the classifier is left
    at its initialisation (fine-tuning to a new label set).
    """
    path = weights_path(entry, allow_unverified, progress)
    state = load_state_dict_file(path)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads: list[str] = []
    if getattr(model, "num_classes", entry.num_classes) != entry.num_classes and classifier:
        heads = [classifier] if isinstance(classifier, str) else list(classifier)
    if entry.weights.key_map == "ordered":
        # The file is the entry's own network, classifier included: map it in order onto that
        # network (built without memory), not onto ``model``, whose head may differ or be
        # absent (``num_classes=0``); a differing head is replaced just below.
        import timm

        with torch.device("meta"):
            reference = timm.create_model(entry.arch, **timm_kwargs(entry))
        state = map_keys_in_order(state, reference, source=str(path))
    if heads:
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
        own = model.state_dict()
        state.update({k: v for k, v in own.items() if any(k.startswith(h + ".") for h in heads)})
    load_weights_into(model, state, source=str(path))


def map_keys_in_order(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    source: str = "state dict",
) -> dict[str, torch.Tensor]:
    """Rename ``state``'s tensors, in order, to ``model``'s keys (``num_batches_tracked``
    dropped on both sides), checking every shape: for checkpoints of the same network
    saved under another implementation's names. ``model`` may be on the meta device."""
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise CheckpointError(
            f"{source}: {len(src)} tensors cannot map in order onto {type(model).__name__}'s "
            f"{len(dst)}"
        )
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if sv.shape != dv.shape:
            raise CheckpointError(
                f"{source}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)} "
                "when mapping keys in order"
            )
        mapped[dk] = sv
    return mapped


# ---------------------------------------------------------------------------- models
def timm_kwargs(entry: ZooEntry, **overrides: Any) -> dict[str, Any]:
    """``timm.create_model`` kwargs for an entry (its ``model_kwargs`` and ``num_classes``)."""
    return {"num_classes": entry.num_classes, **entry.model_kwargs, **overrides}


def create_model(
    name: str,
    pretrained: bool = True,
    allow_unverified: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` for zoo names: ``create_model("zoo:fmnist_resnet10t")``.

    Returns a plain timm model with the entry's verified weights (``pretrained=True``)
    and a ``pretrained_cfg`` carrying the entry's input spec, so
    ``timm.data.resolve_data_config(model=m)`` gives the right preprocessing.
    """
    import timm

    entry = get_entry(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(entry.arch, pretrained=False, **timm_kwargs(entry, **kwargs))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    spec = entry.input
    if spec.get("size"):
        side = spec["size"]
        cfg["input_size"] = (cfg.get("input_size", (3,))[0], side, side)
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in spec:
            cfg[key] = tuple(spec[key]) if isinstance(spec[key], list) else spec[key]
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg
    if pretrained:
        load_entry_weights(model, entry, allow_unverified, progress)
    return model


def entry_file_size(entry: ZooEntry) -> int | None:
    """Bytes of the weights if they are on disk (shipped, installed or cached)."""
    try:
        w = entry.weights
        path = (
            _local_file(entry)
            if w.file
            else _package_file(entry)
            if w.package
            else (_download_target(entry))
        )
    except CheckpointError:
        return None
    return path.stat().st_size if path.is_file() else None
