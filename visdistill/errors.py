"""The few exception types visdistill raises.

Each subclasses the built-in a user would naturally catch (``ValueError``,
``FileNotFoundError``), and every message names the bad value, the valid choices
and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VisdistillError(Exception):
    """Base class of every error visdistill raises on purpose."""


class ConfigError(VisdistillError, ValueError):
    """A configuration value is wrong or inconsistent with another one."""


class UnknownModelError(ConfigError):
    """A model name that timm (or the zoo) does not know."""


class CheckpointError(VisdistillError, ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


class DataNotFoundError(VisdistillError, FileNotFoundError):
    """A data set is not where it was looked for."""


class NonFiniteLossError(VisdistillError, FloatingPointError):
    """A training loss became NaN or infinite (``nonfinite: raise``)."""


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (case-insensitive)."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    if not hits:  # substring fallback: "resnet" -> "resnet18", ...
        hits = sorted(c for c in lowered if name.lower() in c)[:n]
    return [lowered[h] for h in hits]


def format_keys(keys: Iterable[str], limit: int = 10) -> str:
    """``a, b, c (+N more)`` for error messages listing state-dict keys."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
