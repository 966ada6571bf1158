"""An exported agglomerative student: the timm model plus its adaptor heads, emitting each
teacher's features (the deployable product of RADIO-style distillation; Ranzinger, Heinrich,
Kautz, Molchanov, "AM-RADIO: Agglomerative Vision Foundation Model", CVPR 2024).

``visdistill export CKPT --out DIR --with_adaptors`` writes, next to timm's
``model.safetensors`` + ``config.json``:

- ``adaptors.safetensors``: per teacher ``m``, the summary and spatial heads
  (``summary_heads.m.*``, ``spatial_heads.m.*``, the :class:`~visdistill.AdaptorHeads` MLPs)
  and the normalisers' statistics (``summary_norms.m.*``, ``spatial_norms.m.*``), so that the
  heads' normalised outputs map back to the teacher's own feature space;
- ``adaptors.json``: what rebuilds them (see :class:`AgglomerativeStudent`), and the sha256
  of ``model.safetensors``, so heads are never paired with another student's weights.

:meth:`AgglomerativeStudent.from_export` loads the folder; neither the teachers nor the
checkpoint are needed. With ``--format onnx``, ``agglomerative.onnx`` (the student and the
heads in one graph, outputs in each teacher's space) replaces ``adaptors.safetensors``, and
``adaptors.json`` lists its outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .checkpoints import atomic_write, save_safetensors_atomic
from .errors import CheckpointError
from .models import Backbone, InputSpec, ModelConfig, short_name
from .normalizers import make_normalizer
from .terms.adaptor import AdaptorHead, resample_to_grid
from .zoo import sha256_file

ADAPTORS_WEIGHTS = "adaptors.safetensors"
ADAPTORS_CONFIG = "adaptors.json"
ADAPTORS_ONNX = "agglomerative.onnx"
# The files an export with adaptor heads adds next to the student, per format.
ADAPTOR_FILES = {
    "timm": (ADAPTORS_WEIGHTS, ADAPTORS_CONFIG),
    "onnx": (ADAPTORS_ONNX, ADAPTORS_CONFIG),
}
# Output of the ONNX graph holding the student's own pooled features.
ONNX_FEATURES = "features"
_FORMAT = "visdistill-adaptors"
_VERSION = 1
_HEADS = ("summary_heads", "spatial_heads", "summary_norms", "spatial_norms")


def _head_dims(head: AdaptorHead) -> dict[str, int]:
    return {
        "in": head[0].in_features,
        "hidden": head[0].out_features,
        "out": head[3].out_features,
    }


class AgglomerativeStudent(nn.Module):
    """A distilled student with its adaptor heads: per teacher, a summary vector and a
    spatial map in that teacher's feature space.

    ``forward(x)`` runs the timm student once on a preprocessed batch ``x`` ``(B, C, H, W)``
    (resized to ``input_size``, scaled to ``[0, 1]``, normalised with ``mean`` and ``std``,
    as for the plain timm model; :meth:`preprocess` does it for a ``[0, 1]`` batch) and
    returns ``{teacher: {"summary": (B, D_t), "spatial": (B, C_t, h_t, w_t)}}``, exactly as
    the :class:`~visdistill.AdaptorHeads` term computed its predictions in training:

    - **summary**: the summary head applied to the student's pooled features (class token of
      a ViT, pooled map of a CNN);
    - **spatial**: the student's ``student_stage`` map resampled (bilinear) to the teacher's
      grid ``(h_t, w_t)`` (the grid of the teacher's matched stage at its training input
      size), then the spatial head applied at every position.

    By default both are mapped back to the teacher's own space with the normaliser's inverse
    (PHI-S, per-channel standardisation, or nothing); ``normalized=True`` returns the heads'
    raw outputs, in the normalised space the loss compared them in.

    Attributes:
        model: the timm student (what ``timm.create_model("local-dir:DIR", pretrained=True)``
            loads from the same folder).
        teacher_names: the teachers, in training order (the keys of ``forward``'s result).
        grids: each teacher's spatial grid ``(h_t, w_t)``.
        student_stage: index into ``model.feature_info`` of the stage feeding the spatial
            heads.
        input_spec: the student's preprocessing (size, mean, std, interpolation, channels).
        summary_heads, spatial_heads: per teacher, ``Linear -> LayerNorm -> GELU -> Linear``.
        summary_norms, spatial_norms: per teacher, the fitted normalisers.
        spec: the parsed ``adaptors.json``.

    Args:
        model: the timm student.
        spec: the contents of ``adaptors.json`` (see :meth:`from_export`).
    """

    def __init__(self, model: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.model = model.eval()
        self.spec = spec
        student, teachers = spec["student"], spec["teachers"]
        self.student_stage = int(student["stage_index"])
        self.teacher_names = [t["name"] for t in teachers]
        self.grids = [tuple(t["grid"]) for t in teachers]
        self.input_spec = InputSpec(
            size=tuple(student["input_size"][1:]),
            mean=tuple(student["mean"]),
            std=tuple(student["std"]),
            interpolation=student["interpolation"],
            in_chans=int(student["input_size"][0]),
        )
        self.summary_heads = nn.ModuleList(
            AdaptorHead(*(t["summary_head"][k] for k in ("in", "hidden", "out"))) for t in teachers
        )
        self.spatial_heads = nn.ModuleList(
            AdaptorHead(*(t["spatial_head"][k] for k in ("in", "hidden", "out"))) for t in teachers
        )
        self.summary_norms = nn.ModuleList(
            make_normalizer(t["normalizer"], t["summary_dim"]) for t in teachers
        )
        self.spatial_norms = nn.ModuleList(
            make_normalizer(t["normalizer"], t["spatial_dim"]) for t in teachers
        )
        self.eval()

    @classmethod
    def from_export(
        cls, path: str | os.PathLike, map_location: str = "cpu"
    ) -> AgglomerativeStudent:
        """Load a folder written by ``visdistill export --with_adaptors``.

        Args:
            path: the export folder (``model.safetensors``, ``config.json``,
                ``adaptors.safetensors``, ``adaptors.json``).
            map_location: device the weights are loaded to.

        Returns:
            The module in eval mode, float32 (as timm loads ``model.safetensors`` of any
            ``--dtype``).
        """
        import timm
        from safetensors.torch import load_file

        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; pass the --out folder of an export")
        if (folder / ADAPTORS_ONNX).is_file() and not (folder / "model.safetensors").is_file():
            raise CheckpointError(
                f"{folder} is an ONNX export: run {ADAPTORS_ONNX} with onnxruntime (its inputs "
                f"and outputs are listed in {ADAPTORS_CONFIG}), or export the checkpoint again "
                "with --format timm --with_adaptors to load it here"
            )
        missing = [
            n
            for n in ("model.safetensors", "config.json", ADAPTORS_WEIGHTS, ADAPTORS_CONFIG)
            if not (folder / n).is_file()
        ]
        if missing:
            hint = (
                "it is a plain export: export the checkpoint again with --with_adaptors, or "
                "load the student alone with timm.create_model('local-dir:...', pretrained=True)"
                if set(missing) <= {ADAPTORS_WEIGHTS, ADAPTORS_CONFIG}
                else "the export is incomplete: export the checkpoint again"
            )
            raise CheckpointError(f"{folder} lacks {', '.join(missing)}; {hint}")
        try:
            spec = json.loads((folder / ADAPTORS_CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / ADAPTORS_CONFIG} is not readable JSON: {e}") from e
        if not isinstance(spec, dict) or spec.get("format") != _FORMAT:
            raise CheckpointError(
                f"{folder / ADAPTORS_CONFIG} is not a visdistill adaptors file (format "
                f"{spec.get('format') if isinstance(spec, dict) else None!r})"
            )
        if spec.get("version") != _VERSION:
            raise CheckpointError(
                f"{folder / ADAPTORS_CONFIG} has version {spec.get('version')!r}; this "
                f"visdistill reads version {_VERSION}: upgrade visdistill, or export again"
            )
        digest = sha256_file(folder / "model.safetensors")
        if digest != spec["student"]["weights_sha256"]:
            raise CheckpointError(
                f"{folder}/model.safetensors is not the student the adaptor heads were "
                "exported with (its sha256 differs from adaptors.json's): the folder mixes two "
                "exports. Export the checkpoint again with --with_adaptors into a new folder"
            )
        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
        module = cls(model, spec)
        state = load_file(folder / ADAPTORS_WEIGHTS, device=str(map_location))
        own = {k for k in module.state_dict() if not k.startswith("model.")}
        if set(state) != own:
            raise CheckpointError(
                f"{folder / ADAPTORS_WEIGHTS} does not match {ADAPTORS_CONFIG}: missing "
                f"{sorted(own - set(state))[:5]}, unexpected {sorted(set(state) - own)[:5]}; "
                "export again"
            )
        module.load_state_dict(state, strict=False)
        return module.to(map_location).eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """A ``(B, 3, H, W)`` batch in ``[0, 1]`` -> the student's input: resized to
        ``input_size``, averaged to one channel for a grayscale student, normalised."""
        return self.input_spec.apply(images)

    def student_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The student's own ``(summary (B, D_s), spatial map (B, C_s, h, w))`` for a
        preprocessed batch ``x`` ``(B, C, H, W)``: its pooled (pre-logits) features and its
        ``student_stage`` map."""
        final, inter = self.model.forward_intermediates(x, indices=[self.student_stage])
        return self.model.forward_head(final, pre_logits=True), inter[0]

    def forward(
        self, x: Tensor, normalized: bool = False, grid: tuple[int, int] | None = None
    ) -> dict[str, dict[str, Tensor]]:
        """Each teacher's features predicted from the preprocessed batch ``x`` ``(B, C, H, W)``.

        Args:
            x: preprocessed images (see the class docstring, or :meth:`preprocess`).
            normalized: return the heads' outputs in the normalised space instead of the
                teacher's space.
            grid: ``(h, w)`` of the spatial outputs for every teacher, instead of each
                teacher's training grid (the heads work position by position, so any grid
                runs; outputs off the training grid were never supervised).

        Returns:
            ``{teacher: {"summary": (B, D_t), "spatial": (B, C_t, h_t, w_t)}}``.
        """
        summary, spatial_map = self.student_features(x)
        out: dict[str, dict[str, Tensor]] = {}
        for m, name in enumerate(self.teacher_names):
            pred_summary, pred_spatial = self._predict(m, summary, spatial_map, grid)
            if not normalized:
                pred_summary = self.summary_norms[m].inverse(pred_summary)
                pred_spatial = self.spatial_norms[m].inverse(pred_spatial)
            out[name] = {"summary": pred_summary, "spatial": pred_spatial}
        return out

    def _predict(
        self, m: int, summary: Tensor, spatial_map: Tensor, grid: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Teacher ``m``'s heads in the normalised space: ``(B, D_t)``, ``(B, C_t, h, w)``."""
        h, w = grid or self.grids[m]
        tokens = rearrange(resample_to_grid(spatial_map, (h, w)), "b c h w -> b (h w) c")
        pred_spatial = self.spatial_heads[m](tokens)  # (B, h*w, C_t)
        pred_spatial = rearrange(pred_spatial, "b (h w) c -> b c h w", h=h, w=w)
        return self.summary_heads[m](summary), pred_spatial

    def extra_repr(self) -> str:
        return f"teachers={self.teacher_names}, grids={self.grids}"


# ---------------------------------------------------------------------- writing


class _OnnxOutputs(nn.Module):
    """``x`` -> ``(student features (B, D_s), then per teacher summary (B, D_t) and spatial
    (B, C_t, h_t, w_t) in the teacher's space)``: the tuple the ONNX graph is traced from."""

    def __init__(self, student: AgglomerativeStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        s = self.student
        summary, spatial_map = s.student_features(x)
        outputs = [summary]
        for m in range(len(s.teacher_names)):
            pred_summary, pred_spatial = s._predict(m, summary, spatial_map)
            # The normalisers' inverse without inverse()'s checks (a branch on a buffer's
            # value cannot be traced); the inputs are float32 and channel-last already.
            outputs.append(s.summary_norms[m]._denormalize(pred_summary))
            tokens = rearrange(pred_spatial, "b c h w -> b h w c")
            back = s.spatial_norms[m]._denormalize(tokens)
            outputs.append(rearrange(back, "b h w c -> b c h w"))
        return tuple(outputs)


@dataclass
class AdaptorExport:
    """The adaptor heads of a checkpoint, ready to write next to its exported student."""

    state: dict[str, Tensor]
    spec: dict[str, Any]

    def write(self, out: Path, student_weights: str = "model.safetensors") -> None:
        """Write ``adaptors.safetensors``, then ``adaptors.json`` (with the sha256 of
        ``out/student_weights``, written before), each atomically."""
        save_safetensors_atomic(self.state, out / ADAPTORS_WEIGHTS, metadata={"format": "pt"})
        self._write_spec(out, dict(self.spec), student_weights)

    def write_onnx(self, out: Path, model: nn.Module, example: Tensor, atol: float) -> None:
        """Write ``agglomerative.onnx`` (the float32 timm ``model`` and the heads in one
        graph, outputs in each teacher's space, checked with onnxruntime within ``atol``),
        then ``adaptors.json`` (with an ``onnx`` section and the sha256 of
        ``out/model.onnx``)."""
        from .export import write_onnx

        student = AgglomerativeStudent(model, self.spec)
        student.load_state_dict({k: v.float() for k, v in self.state.items()}, strict=False)
        graph = _OnnxOutputs(student.eval())
        names = [ONNX_FEATURES]
        for name in student.teacher_names:
            names += [f"{name}.summary", f"{name}.spatial"]
        check = write_onnx(graph, out / ADAPTORS_ONNX, example, names, atol)
        with torch.no_grad():
            shapes = [tuple(o.shape[1:]) for o in graph(example)]
        record = asdict(check)
        for key in ("export_seconds", "check_seconds"):
            record.pop(key)  # the file depends only on the checkpoint
        spec = {**self.spec, "weights": None}
        spec["onnx"] = {
            "file": ADAPTORS_ONNX,
            "space": "teacher",
            "input": {"name": "input", "shape": ["batch", *example.shape[1:]]},
            "outputs": [
                {"name": n, "shape": ["batch", *shape]}
                for n, shape in zip(names, shapes, strict=True)
            ],
            "check": record,
        }
        self._write_spec(out, spec, "model.onnx")

    @staticmethod
    def _write_spec(out: Path, spec: dict[str, Any], student_weights: str) -> None:
        spec["student"] = {
            **spec["student"],
            "weights_file": student_weights,
            "weights_sha256": sha256_file(out / student_weights),
        }
        text = json.dumps(spec, indent=2) + "\n"
        atomic_write(out / ADAPTORS_CONFIG, lambda tmp: Path(tmp).write_text(text))


def _adaptor_term_index(source: Any, ckpt: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Position and config of the checkpoint's one AdaptorHeads term."""
    terms = ckpt["hyper_parameters"].get("terms")
    has_heads = any(".summary_heads." in k for k in ckpt["state_dict"] if k.startswith("terms."))
    if terms is None:
        if has_heads:
            raise CheckpointError(
                f"{source} has adaptor heads, but its hyper-parameters do not record the "
                "terms' arguments (a term of the run was built from non-plain values), so the "
                "heads' stages and normalisers are unknown; export without --with_adaptors"
            )
        terms = []
    found = [
        (i, t)
        for i, t in enumerate(terms)
        if str(t.get("class_path", "")).rsplit(".", 1)[-1] == "AdaptorHeads"
    ]
    if not found:
        names = [str(t.get("class_path", "?")).rsplit(".", 1)[-1] for t in terms]
        raise CheckpointError(
            f"{source} has no AdaptorHeads term (its terms: {', '.join(names) or 'none'}), so "
            "there are no adaptor heads to export; export without --with_adaptors (the "
            "student alone), or train with an AdaptorHeads term"
        )
    if len(found) > 1:
        raise CheckpointError(
            f"{source} has {len(found)} AdaptorHeads terms (terms {[i for i, _ in found]}); "
            "--with_adaptors exports one set of heads per teacher. Export without "
            "--with_adaptors"
        )
    return found[0]


def _architecture_only(config: ModelConfig) -> ModelConfig:
    """``config`` without weights: a zoo entry becomes its timm architecture (with the
    entry's input size and the same alias)."""
    from . import zoo

    config = replace(config, pretrained=False, checkpoint=None, alias=config.alias)
    if not config.name.startswith(zoo.PREFIX):
        return config
    entry = zoo.get_entry(config.name)
    return replace(
        config,
        name=entry.arch,
        model_kwargs={**entry.model_kwargs, **config.model_kwargs},
        input_size=config.input_size or entry.input.get("size"),
        alias=config.alias or short_name(config.name),
    )


def _teachers_and_grids(
    source: Any,
    configs: list[ModelConfig],
    refs: Sequence[str | int] | None,
    stage: Any,
    side: int | None,
) -> tuple[list[int], list[Backbone], list[tuple[int, int]]]:
    """The term's teachers (positions in the ensemble, weightless architectures) and each
    one's ``(h, w)`` at its matched stage, as in training: the canonical batch at the data's
    side, resized by the teacher to its own input size when it has one.

    The architectures are built and run on the ``meta`` device (shapes only: no memory, no
    arithmetic); a model that cannot run there is built on the CPU with random weights."""
    from .teachers import TeacherEnsemble, one_stage_per_teacher

    failure: Exception | None = None
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                ensemble = TeacherEnsemble(configs)
            names = ensemble.names
            indices = (
                list(range(len(names)))
                if refs is None
                else [r if isinstance(r, int) else names.index(r) for r in refs]
            )
            teachers = [ensemble.teachers[i] for i in indices]
            stages = one_stage_per_teacher(stage, len(teachers), "AdaptorHeads")
            grids = []
            for teacher, s in zip(teachers, stages, strict=True):
                size = teacher.input_spec.size or ((side, side) if side else None)
                if size is None:
                    raise CheckpointError(
                        f"teacher {teacher.alias} has no fixed input size and {source} records "
                        "no data image_size; pass --input_size (the side of the training images)"
                    )
                out = teacher(torch.zeros(1, 3, *size, device=device), stages=(s,))
                grids.append(tuple(int(n) for n in out.stages[s].shape[-2:]))
            return indices, teachers, grids
        except CheckpointError:
            raise
        except Exception as e:  # e.g. an architecture that reads a tensor's value at build
            failure = e
    raise CheckpointError(
        f"could not measure the teachers' feature grids by running their architectures "
        f"without weights: {type(failure).__name__}: {str(failure).splitlines()[0]}"
    ) from failure


def adaptors_from_checkpoint(
    source: Any,
    ckpt: dict[str, Any],
    student: Backbone,
    size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    input_size: int | None = None,
) -> AdaptorExport:
    """The AdaptorHeads term of a loaded fit checkpoint ``ckpt``, as files to export.

    The term is rebuilt from its recorded arguments against the student and the teachers'
    *architectures* (built on the ``meta`` device: no teacher weights are read or
    downloaded), and its state is loaded strictly, so every head and normaliser is checked
    against the shapes training used. Heads are cast to ``dtype``; normaliser statistics
    stay float32 (PHI-S rotations lose their orthogonality in 16 bits). ``size``: the
    student's input size recorded in ``config.json``; ``input_size``: the training images'
    side when the checkpoint does not record it.
    """
    from .terms.base import term_from_config

    index, config = _adaptor_term_index(source, ckpt)
    hp = ckpt["hyper_parameters"]
    term = term_from_config(config)
    teacher_configs = [_architecture_only(ModelConfig(**t)) for t in hp.get("teachers", [])]
    side = ckpt.get("datamodule_hyper_parameters", {}).get("image_size") or input_size
    indices, teachers, grids = _teachers_and_grids(
        source, teacher_configs, term.teacher_refs, term.teacher_stage, side
    )
    term.teacher_indices = tuple(indices)
    term.setup(student, teachers)  # heads and normalisers on the CPU, as in training
    prefix = f"terms.{index}."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        term.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source}: the AdaptorHeads state does not match the term rebuilt from its "
            f"arguments: {str(e).splitlines()[0]}"
        ) from e
    if not term.normalizers_fitted:
        raise CheckpointError(
            f"{source}: the AdaptorHeads {term.normalize} normalisers have no statistics (the "
            "checkpoint was written before fit started); export a checkpoint of the trained run"
        )

    exported: dict[str, Tensor] = {}
    for group in _HEADS:
        for k, v in getattr(term, group).state_dict().items():
            v = v.detach()
            if group.endswith("heads") and v.is_floating_point():
                v = v.to(dtype)
            exported[f"{group}.{k}"] = v
    bad = [k for k, v in exported.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"{source}: the adaptor tensors {bad[:5]} hold NaN/inf "
            f"{'(they exceed the range of ' + str(dtype) + ')' if dtype != torch.float32 else ''}"
            "; export an earlier checkpoint, or with --dtype float32"
        )
    n_s = len(student.feature_info)
    teachers_spec = []
    for m, (teacher, stage, grid) in enumerate(
        zip(teachers, term.per_teacher_stage, grids, strict=True)
    ):
        norm = term.summary_norms[m]
        teachers_spec.append(
            {
                "name": term.teacher_names[m],
                "model": hp["teachers"][indices[m]]["name"],
                "stage": stage,
                "grid": list(grid),
                "input_size": [
                    teacher.input_spec.in_chans,
                    *(teacher.input_spec.size or (side, side)),
                ],
                "summary_dim": term.summary_heads[m][3].out_features,
                "spatial_dim": term.spatial_heads[m][3].out_features,
                "summary_head": _head_dims(term.summary_heads[m]),
                "spatial_head": _head_dims(term.spatial_heads[m]),
                "normalizer": norm.kind,
                "rotation": getattr(norm, "rotation_kind", None),
            }
        )
    spec = {
        "format": _FORMAT,
        "version": _VERSION,
        "weights": ADAPTORS_WEIGHTS,
        "student": {
            "model": student.arch,
            "stage": term.student_stage,
            "stage_index": term.student_stage % n_s,
            "summary_dim": student.num_features,
            "spatial_dim": student.feature_info[term.student_stage]["num_chs"],
            "input_size": [student.input_spec.in_chans, *size],
            "mean": list(student.input_spec.mean),
            "std": list(student.input_spec.std),
            "interpolation": student.input_spec.interpolation,
        },
        "teachers": teachers_spec,
        "term": config["init_args"],
    }
    return AdaptorExport(exported, spec)
