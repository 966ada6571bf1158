"""The agglomerative recipes (issue 19 item 6): the foundation-teacher recipes
(configs/agglomerative_vit_small.yaml, configs/agglomerative_resnet50.yaml: DINOv2, SigLIP 2 and
C-RADIOv3 by timm name) and the zoo recipe (configs/agglomerative_fmnist.yaml).

The timm teachers' weights need the Hugging Face hub, which tests cannot reach: the recipes run
here through the command line's parser with their very architectures, ``pretrained: false``, at
1/8 of their resolution, for a few steps. What pretrained weights would change (the numbers) is
not tested; what the recipes build (models, preprocessing, token grids, prefix tokens, summaries,
heads, probes) is. The zoo recipe runs for real, label-free, from fit to export to
``visdistill probe``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from visdistill import DistillationModule
from visdistill.cli import VisdistillCLI, main
from visdistill.data.base import VisionDataModule
from visdistill.data.fashion_mnist import DEBIAN_DIR
from visdistill.models import Backbone

ROOT = Path(__file__).resolve().parents[1]
TIMM_RECIPES = ["agglomerative_vit_small.yaml", "agglomerative_resnet50.yaml"]
# Each input size of the recipes and its stand-in at about 1/8: the 512 px canvas and C-RADIO
# -> 64; DINOv2's 518 (37 patches of 14) -> 56 (4 patches); 224 (14 patches of 16) -> 32.
SMALL = {512: 64, 518: 56, 224: 32}
# The teachers by alias: patch size, native input size, prefix tokens (class + registers).
TEACHERS = {
    "dinov2": {"patch": 14, "native": 518, "prefix": 5},  # class + 4 registers
    "siglip2": {"patch": 16, "native": 224, "prefix": 0},  # no class token: MAP pooling
    "cradio": {"patch": 16, "native": 512, "prefix": 8},  # class + 7 (summary/register) tokens
}


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _write_class_folder(root: Path, per_class: int, size: int = 72) -> Path:
    """``root/<class>/<image>.png``: two classes of noisy images, one dark and one bright."""
    rng = np.random.default_rng(0)
    for c, (name, base) in enumerate((("dark", 60), ("bright", 190))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{c}_{i:02d}.png")
    return root


def _scaled(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A timm recipe as tests run it: random weights, every input size at ~1/8 (ViTs are
    built for it with ``img_size``), a tiny labelled image folder, a few CPU steps."""
    model = config["model"]
    for m in [model["student"], *model["teachers"]]:
        m["pretrained"] = False
        m["input_size"] = SMALL[m["input_size"]]
        if m["name"].startswith("vit_"):
            m["model_kwargs"] = {**m.get("model_kwargs", {}), "img_size": m["input_size"]}
    model["terms"][0]["init_args"]["fit_samples"] = 8
    data = config["data"]["init_args"]
    data.update(
        train_dir=str(_write_class_folder(tmp_path / "train", per_class=8)),
        val_dir=str(_write_class_folder(tmp_path / "val", per_class=3)),
        image_size=SMALL[data["image_size"]],
        batch_size=4,
        num_workers=0,
    )
    (probe,) = config["trainer"]["callbacks"]
    probe["init_args"].update(max_train_samples=12, batch_size=8)
    config["trainer"].update(
        max_epochs=1,
        limit_train_batches=3,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        enable_checkpointing=False,  # three ViT-B teachers: nothing to save here
        default_root_dir=str(tmp_path),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "r", "version": ""},
        },
    )
    return config


class _StepRecorder(L.Callback):
    """Per training step: the loss, and that no teacher parameter got a gradient while the
    student did; the student's and teachers' weights before training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.student_grad: list[bool] = []

    def on_train_start(self, trainer: L.Trainer, module: DistillationModule) -> None:
        self.student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
        self.teachers_before = {k: v.clone() for k, v in module.teachers.state_dict().items()}

    def on_after_backward(self, trainer: L.Trainer, module: DistillationModule) -> None:
        assert all(p.grad is None for p in module.teachers.parameters())
        self.student_grad.append(
            any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(config: dict, tmp_path, monkeypatch) -> tuple[VisdistillCLI, _StepRecorder]:
    """``visdistill fit`` on ``config`` through the command line's parser and classes
    (visdistill.commands.lightning), with a recorder of the training steps' losses."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    recorder = _StepRecorder()
    cli = VisdistillCLI(
        DistillationModule,
        VisionDataModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [recorder]},
        args=["fit", "--config", str(path)],
    )
    return cli, recorder


@pytest.mark.parametrize("recipe", TIMM_RECIPES)
def test_timm_teacher_recipe_trains_through_the_cli_at_reduced_size(recipe, tmp_path, monkeypatch):
    config = _scaled(_recipe(recipe), tmp_path)
    cli, recorder = _fit(config, tmp_path, monkeypatch)
    module = cli.model

    # Three optimisation steps, finite losses; the student learnt, the teachers did not.
    assert len(recorder.losses) == 3 and all(math.isfinite(v) for v in recorder.losses)
    assert all(recorder.student_grad)
    after = module.student.state_dict()
    moved = [k for k, v in recorder.student_before.items() if not torch.equal(v, after[k])]
    assert len(moved) > len(after) // 2, moved
    teachers_after = module.teachers.state_dict()
    assert all(torch.equal(v, teachers_after[k]) for k, v in recorder.teachers_before.items())

    # Each teacher runs at its own size with its own preprocessing (timm's pretrained_cfg of
    # the named weights) and gives its spatial target on its own patch grid.
    teachers = {t.alias: t for t in module.teachers}
    assert list(teachers) == list(TEACHERS)
    images = torch.rand(2, 3, 64, 64)
    outs = module.teachers(images, stages=module.teacher_stages, pooled=True)
    for (alias, teacher), out in zip(teachers.items(), outs, strict=True):
        spec = TEACHERS[alias]
        side = SMALL[spec["native"]]
        cfg = timm.models.get_pretrained_cfg(teacher.name)  # the named weights' own
        assert teacher.input_spec.size == (side, side)
        assert teacher.input_spec.mean == tuple(cfg.mean) and teacher.input_spec.std == tuple(
            cfg.std
        )
        assert teacher.model.num_prefix_tokens == spec["prefix"]
        grid = side // spec["patch"]
        assert out.stages[-1].shape == (2, 768, grid, grid), alias
        assert out.pooled.shape == (2, 768) and out.logits is None

    # The adaptor heads: fitted PHI-S statistics and one head pair per teacher, from the
    # student's summary and map to each teacher's widths.
    term = module.terms[0]
    assert term.teacher_names == list(TEACHERS)
    assert all(bool(n.fitted) for n in [*term.summary_norms, *term.spatial_norms])
    student_width = module.student.num_features
    assert all(h[0].in_features == student_width for h in term.summary_heads)
    assert all(h[-1].out_features == 768 for h in [*term.summary_heads, *term.spatial_heads])

    # Label-free training, kNN probe on the labelled validation folder.
    knn = float(cli.trainer.callback_metrics["val/knn_top1"])
    assert 0.0 <= knn <= 1.0
    assert "val/acc" not in cli.trainer.callback_metrics


def _last_block_tokens(backbone: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The last block's output ``(B, N, C)`` (all tokens) captured by a hook, and the
    backbone's output with stage -1 and the pooled features."""
    captured = {}
    handle = backbone.model.blocks[-1].register_forward_hook(
        lambda _m, _i, out: captured.setdefault("tokens", out)
    )
    try:
        with torch.no_grad():
            out = backbone(images, stages=(-1,), pooled=True)
    finally:
        handle.remove()
    return captured["tokens"], out


@pytest.mark.parametrize("alias", list(TEACHERS))
def test_foundation_teachers_at_native_size_give_patch_grids_without_prefix_tokens(alias):
    """Each recipe teacher at its native size (one block deep, to stay fast): the spatial map
    is the grid of patch tokens, class and register tokens left out, in raster order; the
    summary is the class token after the final norm (DINOv2, C-RADIO: timm's
    ``global_pool: token``) or the MAP head's output (SigLIP 2)."""
    (config,) = [t for t in _recipe(TIMM_RECIPES[0])["model"]["teachers"] if t["alias"] == alias]
    spec = TEACHERS[alias]
    assert config["input_size"] == spec["native"] and config["num_classes"] == 0
    teacher = Backbone(
        config["name"], num_classes=0, input_size=config["input_size"], model_kwargs={"depth": 1}
    ).eval()
    side = spec["native"]
    tokens, out = _last_block_tokens(teacher, torch.rand(1, 3, 64, 64))
    grid = side // spec["patch"]
    assert tokens.shape == (1, spec["prefix"] + grid * grid, 768)
    expected = tokens[:, spec["prefix"] :].reshape(1, grid, grid, 768).permute(0, 3, 1, 2)
    assert out.stages[-1].shape == (1, 768, grid, grid)  # 37x37 / 14x14 / 32x32
    torch.testing.assert_close(out.stages[-1], expected)
    model = teacher.model
    if alias == "siglip2":
        assert model.global_pool == "map"
        torch.testing.assert_close(out.pooled, model.attn_pool(model.norm(tokens)))
    else:
        assert model.global_pool == "token"
        torch.testing.assert_close(out.pooled, model.norm(tokens)[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TIMM_RECIPES)
def test_timm_teacher_recipe_two_steps_at_full_resolution(recipe, tmp_path, monkeypatch):
    """The recipe's own sizes (512 px canvas, teachers at 518 / 224 / 512, student at 224),
    random weights, two steps of batch 2 on the CPU (a few minutes)."""
    config = _scaled(_recipe(recipe), tmp_path)
    original = _recipe(recipe)
    for scaled, full in zip(
        [config["model"]["student"], *config["model"]["teachers"]],
        [original["model"]["student"], *original["model"]["teachers"]],
        strict=True,
    ):
        scaled["input_size"] = full["input_size"]
        scaled["model_kwargs"] = full.get("model_kwargs", {})
    config["data"]["init_args"]["image_size"] = original["data"]["init_args"]["image_size"]
    config["data"]["init_args"]["batch_size"] = 2
    config["model"]["terms"][0]["init_args"]["fit_samples"] = 2
    config["trainer"]["limit_train_batches"] = 2
    config["trainer"]["limit_val_batches"] = 1
    cli, recorder = _fit(config, tmp_path, monkeypatch)
    assert len(recorder.losses) == 2 and all(math.isfinite(v) for v in recorder.losses)
    grids = {
        t.alias: t.input_spec.size[0] // TEACHERS[t.alias]["patch"] for t in cli.model.teachers
    }
    assert grids == {"dinov2": 37, "siglip2": 14, "cradio": 32}
    assert 0.0 <= float(cli.trainer.callback_metrics["val/knn_top1"]) <= 1.0


@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")
def test_zoo_recipe_label_free_fit_export_and_probe_command(tmp_path, capsys):
    """configs/agglomerative_fmnist.yaml (the three zoo teachers used headless) on 512 training
    images for two steps, through `visdistill fit`; `visdistill export` of its last checkpoint;
    `visdistill probe` on the same labelled data gives the kNN top-1 the run logged."""
    config = _recipe("agglomerative_fmnist.yaml")
    data_args = {**config["data"]["init_args"], "train_subset": 512, "val_split": 128}
    data_args["batch_size"] = 64
    config["data"]["init_args"] = data_args
    config["model"]["terms"][0]["init_args"]["fit_samples"] = 128
    (probe,) = config["trainer"]["callbacks"]
    probe["init_args"]["max_train_samples"] = 256
    config["trainer"].update(
        max_epochs=1,
        limit_train_batches=2,
        accelerator="cpu",
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "agg", "version": ""},
        },
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--progress", "lines"])
    run = tmp_path / "runs" / "agg"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")]
    assert len(logged) == 1 and 0.0 < logged[0] <= 1.0

    main(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "student")])
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_classes"] == 0
    probe_config = {
        "data": {"class_path": config["data"]["class_path"], "init_args": data_args},
        "split": "val",
        "max_train_samples": 256,
        "linear": False,
        "device": "cpu",
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(probe_config))
    capsys.readouterr()
    out = tmp_path / "probe.json"
    main(
        ["probe", str(tmp_path / "student"), "--config", str(tmp_path / "probe.yaml")]
        + ["--json", str(out)]
    )
    result = json.loads(out.read_text())
    # Same student, data, reference cap, seed and memory format (channels_last, as the fit):
    # the callback's number. In the default format a vote flipped (1 image of 128).
    assert result["knn_top1"] == pytest.approx(logged[0], abs=1e-6)
    assert (result["split"], result["num_train"], result["num_eval"]) == ("val", 256, 128)
    assert f"kNN top-1 (k=20, T=0.07): {100 * result['knn_top1']:.2f} %" in capsys.readouterr().out
