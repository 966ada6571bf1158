"""Search spaces of timm students, and the cost constraints candidates must meet.

A :class:`Candidate` is a timm architecture name plus ``timm.create_model`` kwargs: exactly
what a ``visdistill fit`` config's ``student: {name, model_kwargs}`` holds, so the winner of a
search trains with no extra code.

Spaces:

- :class:`ModelListSpace`: timm names and ``fnmatch`` globs over ``timm.list_models``
  (``"mobilenetv3_small_*,lcnet_0*0,resnet10t"``).
- :class:`ResNetSpace`: timm's ``ResNet`` with a depth per stage and a width multiplier
  (``resnet10t`` kwargs ``layers``, ``channels``, ``stem_width``).
- :class:`MobileNetV3Space`: MobileNetV3 width variants (``mobilenetv3_small_050`` ...)
  times a ``depth_multiplier`` (a kwarg timm's ``_gen_mobilenet_v3`` accepts).

Costs (:func:`measure_cost`): parameters and FLOPs from one forward of the model built on
the ``meta`` device (no memory, no arithmetic) under ``torch.utils.flop_counter``, and CPU
latency measured on the real model when a latency limit asks for it.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch

from ..errors import ConfigError, UnknownModelError, close_matches
from ..formatting import format_count
from ..models import Backbone, check_model_name


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Candidate:
    """One student architecture: ``timm.create_model(arch, **model_kwargs)``. Hashable."""

    arch: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, arch: str, **model_kwargs: Any) -> Candidate:
        return cls(arch, _freeze(model_kwargs))

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The kwargs as plain lists/values (YAML- and JSON-ready)."""
        return {k: _thaw(v) for k, v in self.kwargs}

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.arch
        parts = [
            f"{k}={','.join(map(str, _thaw(v))) if isinstance(v, tuple) else v}"
            for k, v in self.kwargs
        ]
        return f"{self.arch}[{' '.join(parts)}]"

    def build(self, num_classes: int, input_size: int | None = None) -> Backbone:
        """The candidate as a :class:`Backbone` (what ``visdistill fit`` builds)."""
        return Backbone(
            self.arch,
            num_classes=num_classes,
            input_size=input_size,
            model_kwargs=self.model_kwargs,
        )


class SearchSpace:
    """Base class. Subclasses implement :meth:`sample`; finite ones :meth:`candidates`;
    structured ones :meth:`mutate` and :meth:`crossover` (evolution falls back to a fresh
    sample and to no crossover)."""

    def sample(self, rng: random.Random) -> Candidate:
        raise NotImplementedError

    def candidates(self) -> list[Candidate]:
        """Every candidate, in a fixed order."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.candidates())

    def mutate(self, candidate: Candidate, rng: random.Random) -> Candidate:
        """A neighbour of ``candidate`` (default: a random other member)."""
        members = self.candidates()
        others = [c for c in members if c != candidate] or members
        return rng.choice(others)

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate | None:
        """A child mixing ``a`` and ``b``, or ``None`` when the space has no structure."""
        return None

    def smallest(self) -> Candidate | None:
        """The candidate with the fewest parameters, when the space knows it without
        measuring (families); ``None`` otherwise."""
        return None

    def describe(self) -> str:
        return f"{type(self).__name__} ({len(self)} candidates)"


class CandidateList(SearchSpace):
    """A fixed list of candidates (no structure: mutation picks another member)."""

    def __init__(self, candidates: Sequence[Candidate], description: str | None = None) -> None:
        self._candidates = list(dict.fromkeys(candidates))
        if not self._candidates:
            raise ConfigError("a search space needs at least one candidate")
        self._description = description

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    def sample(self, rng: random.Random) -> Candidate:
        return rng.choice(self._candidates)

    def describe(self) -> str:
        return self._description or super().describe()


class ModelListSpace(CandidateList):
    """timm names and globs (``fnmatch`` over ``timm.list_models()``), in the given order.

    Args:
        patterns: names or globs; a string is split on commas.
        exclude: globs removed from the result.

    Raises :class:`UnknownModelError` with close matches for an unknown plain name, and
    :class:`ConfigError` for a glob that matches nothing.
    """

    def __init__(self, patterns: str | Sequence[str], exclude: Sequence[str] = ()) -> None:
        if isinstance(patterns, str):
            patterns = [p.strip() for p in patterns.split(",")]
        patterns = [p for p in patterns if p]
        if not patterns:
            raise ConfigError("the search space names no models; give timm names or globs")
        names: list[str] = []
        all_models: list[str] | None = None
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                all_models = all_models if all_models is not None else timm.list_models()
                hits = fnmatch.filter(all_models, pattern)
                if not hits:
                    stem = pattern.strip("*?[]").split("*")[0]
                    hints = close_matches(stem, all_models) if stem else []
                    hint = f" Names like it: {', '.join(hints)}." if hints else ""
                    raise ConfigError(f"glob {pattern!r} matches no timm model.{hint}")
                names += hits
            else:
                if pattern.startswith("zoo:"):
                    raise ConfigError(
                        f"{pattern}: zoo entries are trained models; a search space lists "
                        "timm architectures (the zoo entry's arch is in `visdistill zoo show`)"
                    )
                check_model_name(pattern)
                names.append(pattern)
        seen: set[str] = set()
        unique = []
        for name in names:
            if name not in seen and not any(fnmatch.fnmatch(name, e) for e in exclude):
                seen.add(name)
                unique.append(name)
        if not unique:
            raise UnknownModelError(f"the search space {patterns} is empty after exclusions")
        super().__init__([Candidate.of(n) for n in unique])


class GeneSpace(SearchSpace):
    """A product space: one choice per gene; mutation changes one gene, crossover picks
    each gene from either parent. Subclasses map a gene tuple to a :class:`Candidate`."""

    genes: dict[str, tuple[Any, ...]]

    def decode(self, genome: tuple[Any, ...]) -> Candidate:
        raise NotImplementedError

    def _check_genes(self) -> None:
        for gene, choices in self.genes.items():
            if not choices:
                raise ConfigError(f"{type(self).__name__}: gene {gene!r} has no choices")
        self._by_candidate = {self.decode(g): g for g in self._genomes()}

    def _genomes(self):
        return itertools.product(*self.genes.values())

    def candidates(self) -> list[Candidate]:
        return list(self._by_candidate)

    def __len__(self) -> int:
        return math.prod(len(c) for c in self.genes.values())

    def genome(self, candidate: Candidate) -> tuple[Any, ...]:
        try:
            return self._by_candidate[candidate]
        except KeyError:
            raise ConfigError(f"{candidate.label} is not in {self.describe()}") from None

    def sample(self, rng: random.Random) -> Candidate:
        return self.decode(tuple(rng.choice(c) for c in self.genes.values()))

    def mutate(self, candidate: Candidate, rng: random.Random) -> Candidate:
        genome = list(self.genome(candidate))
        mutable = [i for i, c in enumerate(self.genes.values()) if len(c) > 1]
        if not mutable:
            return candidate
        i = rng.choice(mutable)
        choices = list(self.genes.values())[i]
        genome[i] = rng.choice([c for c in choices if c != genome[i]])
        return self.decode(tuple(genome))

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        ga, gb = self.genome(a), self.genome(b)
        return self.decode(
            tuple(x if rng.random() < 0.5 else y for x, y in zip(ga, gb, strict=True))
        )

    def smallest(self) -> Candidate:
        return self.decode(tuple(min(c) for c in self.genes.values()))

    def describe(self) -> str:
        genes = "; ".join(f"{k} in {list(v)}" for k, v in self.genes.items())
        return f"{type(self).__name__} ({len(self)} candidates: {genes})"


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


class ResNetSpace(GeneSpace):
    """timm ``ResNet`` students: a depth per stage (4 stages) and one width multiplier.

    Built as ``timm.create_model(base, layers=[d1, d2, d3, d4], channels=[round8(c * w)],
    stem_width=round8(stem * w))``; ``base`` fixes the block type and stem (``resnet10t``:
    basic blocks, tiered deep stem, average-pool shortcuts).

    Args:
        base: a timm ResNet entry point whose kwargs these override.
        depths: choices of blocks per stage.
        widths: choices of width multiplier applied to ``channels`` and ``stem_width``.
        channels: the stage widths at multiplier 1.
        stem_width: the stem width at multiplier 1 (``resnet10t``: 32).
    """

    def __init__(
        self,
        base: str = "resnet10t",
        depths: Sequence[int] = (1, 2),
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        channels: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 32,
    ) -> None:
        check_model_name(base)
        if any(int(d) < 1 for d in depths):
            raise ConfigError(f"ResNetSpace depths must be >= 1, got {list(depths)}")
        if any(w <= 0 for w in widths):
            raise ConfigError(f"ResNetSpace widths must be > 0, got {list(widths)}")
        if len(channels) != 4:
            raise ConfigError(
                f"timm's ResNet has 4 stages; channels needs 4 values, got {list(channels)}"
            )
        self.base, self.channels, self.stem_width = base, tuple(channels), int(stem_width)
        depths = tuple(sorted({int(d) for d in depths}))
        self.genes = {f"depth{i + 1}": depths for i in range(4)}
        self.genes["width"] = tuple(sorted({float(w) for w in widths}))
        self._check_genes()

    def decode(self, genome: tuple[Any, ...]) -> Candidate:
        *layers, width = genome
        return Candidate.of(
            self.base,
            layers=list(layers),
            channels=[_round8(c * width) for c in self.channels],
            stem_width=_round8(self.stem_width * width),
        )


class MobileNetV3Space(GeneSpace):
    """MobileNetV3 students: timm's width variants times a depth multiplier.

    ``timm.create_model(variant, depth_multiplier=m)`` (``_gen_mobilenet_v3`` scales the
    repeats of every stage by ``m``, rounding up; ``m = 1`` is left out of the kwargs).

    Args:
        variants: timm MobileNetV3 names (each fixes a channel multiplier).
        depth_multipliers: choices of repeat multiplier.
    """

    def __init__(
        self,
        variants: Sequence[str] = (
            "mobilenetv3_small_050",
            "mobilenetv3_small_075",
            "mobilenetv3_small_100",
            "mobilenetv3_large_075",
            "mobilenetv3_large_100",
        ),
        depth_multipliers: Sequence[float] = (0.5, 0.75, 1.0),
    ) -> None:
        for v in variants:
            check_model_name(v)
            if not v.startswith(("mobilenetv3_", "tf_mobilenetv3_")):
                raise ConfigError(
                    f"MobileNetV3Space variants must be MobileNetV3 models, got {v!r}"
                )
        if any(m <= 0 for m in depth_multipliers):
            raise ConfigError(f"depth multipliers must be > 0, got {list(depth_multipliers)}")
        self.genes = {
            "variant": tuple(variants),
            "depth_multiplier": tuple(sorted({float(m) for m in depth_multipliers})),
        }
        self._check_genes()

    def decode(self, genome: tuple[Any, ...]) -> Candidate:
        variant, mult = genome
        return (
            Candidate.of(variant) if mult == 1.0 else Candidate.of(variant, depth_multiplier=mult)
        )

    def smallest(self) -> Candidate:
        return self.decode((self.genes["variant"][0], min(self.genes["depth_multiplier"])))


FAMILIES: dict[str, type[GeneSpace]] = {"resnet": ResNetSpace, "mobilenetv3": MobileNetV3Space}
FAMILY_PREFIX = "family:"


def parse_space(spec: str, family_args: dict[str, Any] | None = None) -> SearchSpace:
    """``family:resnet`` / ``family:mobilenetv3`` (with ``family_args`` for its constructor),
    or comma-separated timm names and globs."""
    if spec.startswith(FAMILY_PREFIX):
        family = spec[len(FAMILY_PREFIX) :]
        if family not in FAMILIES:
            hints = close_matches(family, FAMILIES) or list(FAMILIES)
            raise ConfigError(
                f"unknown search family {family!r}; known: "
                f"{', '.join(FAMILY_PREFIX + f for f in FAMILIES)} (did you mean "
                f"{FAMILY_PREFIX}{hints[0]}?)"
            )
        try:
            return FAMILIES[family](**(family_args or {}))
        except TypeError as e:
            raise ConfigError(f"{spec}: bad family arguments {family_args}: {e}") from e
    if family_args:
        raise ConfigError("family arguments only apply to family:<name> spaces")
    return ModelListSpace(spec)


# ------------------------------------------------------------------------------- costs
@dataclass
class Cost:
    """A candidate's cost: parameters, FLOPs of one forward of one image at the data's
    input size (multiply-add = 2 FLOPs, as ``torch.utils.flop_counter`` counts), and the
    median CPU latency in ms of a batch-1 forward (``None`` when not measured)."""

    params: int
    flops: int | None = None
    latency_ms: float | None = None


def measure_cost(
    candidate: Candidate,
    num_classes: int,
    input_size: int = 32,
    flops: bool = True,
    latency: bool = False,
    latency_runs: int = 10,
) -> Cost:
    """Parameters and FLOPs from the candidate built on the ``meta`` device (nothing is
    allocated or computed), latency from the real model in eval mode under ``no_grad``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = candidate.build(num_classes)
    params = sum(p.numel() for p in model.parameters())
    n_flops = None
    if flops:
        model.eval()
        x = torch.empty(1, 3, input_size, input_size, device="meta")
        with FlopCounterMode(display=False) as counter:
            model(x)
        n_flops = int(counter.get_total_flops())
    latency_ms = None
    if latency:
        real = candidate.build(num_classes).eval()
        x = torch.rand(1, 3, input_size, input_size)
        times = []
        with torch.no_grad():
            for i in range(latency_runs + 2):
                start = time.perf_counter()
                real(x)
                if i >= 2:  # two warm-up runs
                    times.append((time.perf_counter() - start) * 1e3)
        latency_ms = statistics.median(times)
    return Cost(params=params, flops=n_flops, latency_ms=latency_ms)


@dataclass
class Constraints:
    """Upper limits on a candidate's cost (``None``: no limit)."""

    max_params: int | None = None
    max_flops: int | None = None
    max_latency_ms: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_params, self.max_flops, self.max_latency_ms))

    def violations(self, cost: Cost) -> list[str]:
        """What ``cost`` exceeds, as readable phrases (empty: it fits)."""
        out = []
        if self.max_params is not None and cost.params > self.max_params:
            out.append(f"{format_count(cost.params)} params > {format_count(self.max_params)}")
        if self.max_flops is not None and cost.flops is not None and cost.flops > self.max_flops:
            out.append(f"{format_count(cost.flops)} FLOPs > {format_count(self.max_flops)}")
        if (
            self.max_latency_ms is not None
            and cost.latency_ms is not None
            and cost.latency_ms > self.max_latency_ms
        ):
            out.append(f"{cost.latency_ms:.1f} ms > {self.max_latency_ms:g} ms")
        return out


def parse_count(text: str | float | int | None) -> int | None:
    """``'2.5M' -> 2500000``, ``'300k'``, ``'1G'``, plain numbers; ``None`` stays ``None``."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale != 1 else s) * scale
    except ValueError:
        raise ConfigError(
            f"not a count: {text!r}; use a number like 2500000, 2.5M or 300k"
        ) from None
    if value <= 0:
        raise ConfigError(f"a limit must be positive, got {text!r}")
    return int(value)
