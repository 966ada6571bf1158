"""Numbers as people read them in logs and tables: counts, durations, accuracies."""

from __future__ import annotations

import math


def format_count(n: float, sep: str = "") -> str:
    """``1234567`` -> ``1.23M`` (3 significant digits; ``sep=" "``: ``1.23 M``); ``k``,
    ``M``, ``G`` prefixes; below 1000 the plain number."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{sep}{unit}"
    return f"{n:g}"


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``1m15s``, ``3725`` -> ``1h02m05s``, ``8.2`` -> ``8.2s``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def is_accuracy(name: str) -> bool:
    """Whether metric ``name`` is a fraction of correct answers (``val/acc``,
    ``val/<teacher>_acc``, ``val/knn_top1``)."""
    last = name.rsplit("/", 1)[-1]
    return "acc" in last or last.endswith("top1")


def format_metric(name: str, value: float) -> str:
    """Accuracies (``*acc*``, and the probes' ``*top1``, stored as fractions) as percentages
    with 2 decimals; the rest with 4 significant digits."""
    if is_accuracy(name):
        return f"{100 * value:.2f} %"
    return f"{value:.4g}"
