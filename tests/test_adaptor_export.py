"""Export of an agglomerative student: the student alone for timm, or with its adaptor heads
(``--with_adaptors``) loaded by ``AgglomerativeStudent.from_export``, whose outputs must be the
AdaptorHeads term's predictions of training, in the normalised and the teachers' spaces."""

import json
import shutil

import pytest
import timm
import torch
from einops import rearrange
from safetensors.torch import load_file

from visdistill import (
    AgglomerativeStudent,
    CheckpointError,
    ConfigError,
    DistillationModule,
    export_student,
)
from visdistill.cli import main
from visdistill.resume import KEY
from visdistill.terms.adaptor import resample_to_grid

TINY = dict(name="resnet10t", model_kwargs=dict(channels=(8, 8, 16, 16), stem_width=8))
VIT = {
    "name": "vit_tiny_patch16_224",
    "num_classes": 0,
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
}


def _fit(root, student, teachers, term_args) -> str:
    """A 2-step label-free fit on digits; the path of its last.ckpt."""
    config = {
        "seed_everything": 0,
        "model": {
            "student": student,
            "teachers": teachers,
            "terms": [
                {
                    "class_path": "visdistill.AdaptorHeads",
                    "init_args": {"fit_samples": 32, **term_args},
                }
            ],
            "ce_weight": 0.0,
        },
        "data": {
            "class_path": "visdistill.DigitsDataModule",
            "init_args": {"batch_size": 16, "labels": False},
        },
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root / "runs"), "name": "agg", "version": ""},
            },
        },
    }
    path = root / "c.yaml"
    path.write_text(json.dumps(config))
    main(["fit", "--config", str(path)])
    return str(root / "runs" / "agg" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory):
    """CNN student; a ViT (4x4 grid) and a ResNet-10t (stage -2: 2x2 grid) teacher; PHI-S."""
    teachers = [VIT, {"name": "resnet10t", "num_classes": 0, "pretrained": False, "alias": "cnn"}]
    args = {"teacher_stage": [-1, -2], "normalize": "phi_s"}
    return _fit(tmp_path_factory.mktemp("cnn"), {**TINY, "num_classes": 0}, teachers, args)


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    """ViT student with a classifier (class token summary); per-channel standardisation;
    the term reads two of three teachers, in another order, one of them from the zoo (its
    architecture is rebuilt from the zoo entry at export, without its weights)."""
    teachers = [
        {"name": "resnet10t", "num_classes": 0, "pretrained": False, "alias": "unused"},
        {"name": "zoo:fmnist_resnet10t", "num_classes": 0},
        {**VIT, "alias": "vit.t"},
    ]
    args = {
        "normalize": "standardize",
        "teachers": ["vit.t", 1],
        "teacher_stage": [-1, -2],
        "student_stage": 0,
    }
    return _fit(tmp_path_factory.mktemp("vit"), {**VIT, "num_classes": 10}, teachers, args)


def _term_predictions(checkpoint: str, images: torch.Tensor):
    """What the training-time term predicts for ``images`` ``(B, 3, H, W)`` in ``[0, 1]``:
    ``{teacher: (summary (B, D_t), spatial (B, h*w, C_t), term)}`` in the normalised space."""
    module = DistillationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    term = module.terms[0]
    with torch.no_grad():
        student = module.student(images, stages=module.student_stages, pooled=True)
        teachers = term.own(module.teachers(images, stages=module.teacher_stages, pooled=True))
        out = {}
        for m, name in enumerate(term.teacher_names):
            t_map = teachers[m].stages[term.per_teacher_stage[m]]
            s_map = resample_to_grid(student.stages[term.student_stage], t_map.shape[-2:])
            out[name] = (
                term.summary_heads[m](student.pooled),
                term.spatial_heads[m](rearrange(s_map, "b c h w -> b (h w) c")),
                t_map.shape,
            )
    return out, term


def _check_matches_term(checkpoint: str, folder) -> AgglomerativeStudent:
    model = AgglomerativeStudent.from_export(folder)
    images = torch.rand(3, 3, 32, 32)
    expected, term = _term_predictions(checkpoint, images)
    with torch.no_grad():
        x = model.preprocess(images)
        normalised, teacher_space = model(x, normalized=True), model(x)
    assert list(normalised) == list(teacher_space) == term.teacher_names == model.teacher_names
    for m, name in enumerate(term.teacher_names):
        summary, spatial, t_shape = expected[name]
        got = normalised[name]
        assert got["summary"].shape == summary.shape
        assert got["spatial"].shape == (3, t_shape[1], *t_shape[-2:])  # the teacher's grid
        tokens = rearrange(got["spatial"], "b c h w -> b (h w) c")
        torch.testing.assert_close(got["summary"], summary, atol=1e-5, rtol=0)
        torch.testing.assert_close(tokens, spatial, atol=1e-5, rtol=0)
        # The teacher's space: the training normalisers' inverse of the same predictions.
        back = teacher_space[name]
        torch.testing.assert_close(
            back["summary"], term.summary_norms[m].inverse(summary), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            rearrange(back["spatial"], "b c h w -> b (h w) c"),
            term.spatial_norms[m].inverse(spatial),
            atol=1e-5,
            rtol=0,
        )
    return model


def test_export_with_adaptors_reproduces_the_training_heads(cnn_ckpt, tmp_path):
    out = export_student(cnn_ckpt, tmp_path / "agg", with_adaptors=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "adaptors.json",
        "adaptors.safetensors",
        "config.json",
        "model.safetensors",
    ]
    spec = json.loads((out / "adaptors.json").read_text())
    vit, cnn = spec["teachers"]
    assert (vit["name"], vit["grid"], vit["spatial_dim"], vit["summary_dim"]) == (
        "vit_tiny_patch16_224",
        [4, 4],
        192,
        192,
    )
    assert (cnn["name"], cnn["stage"], cnn["grid"], cnn["spatial_dim"]) == ("cnn", -2, [2, 2], 256)
    assert {vit["normalizer"], cnn["normalizer"]} == {"phi_s"}
    assert spec["student"]["stage"] == -1 and spec["student"]["spatial_dim"] == 16
    model = _check_matches_term(cnn_ckpt, out)
    # The PHI-S map is not the identity: the two spaces differ.
    x = model.preprocess(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        a, b = model(x, normalized=True)["cnn"]["summary"], model(x)["cnn"]["summary"]
        assert (a - b).abs().max() > 1e-3
        # Any grid runs: the heads are applied position by position.
        assert model(x, grid=(3, 5))["cnn"]["spatial"].shape == (2, 256, 3, 5)
    # The timm model inside is the plain export's student.
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model.model(x))
    # --dtype float16 stores the heads in float16 (the normalisers stay float32); they load
    # into a float32 module, as timm loads the student.
    half = export_student(cnn_ckpt, tmp_path / "half", dtype="float16", with_adaptors=True)
    stored = load_file(half / "adaptors.safetensors")
    assert stored["summary_heads.0.0.weight"].dtype == torch.float16
    assert stored["spatial_norms.0.rotation"].dtype == torch.float32
    loaded = AgglomerativeStudent.from_export(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        got, ref = loaded(x, normalized=True)["cnn"]["spatial"], model(x, normalized=True)
        torch.testing.assert_close(got, ref["cnn"]["spatial"], atol=2e-2, rtol=2e-2)


def test_vit_student_standardize_and_a_zoo_teacher_subset(vit_ckpt, tmp_path):
    out = export_student(vit_ckpt, tmp_path / "agg", with_adaptors=True)
    spec = json.loads((out / "adaptors.json").read_text())
    vit, zoo = spec["teachers"]
    assert (vit["name"], vit["grid"]) == ("vit.t", [4, 4])  # '.' in a name is kept
    assert (zoo["name"], zoo["model"], zoo["grid"]) == (
        "fmnist_resnet10t",
        "zoo:fmnist_resnet10t",
        [2, 2],
    )
    assert {vit["normalizer"], zoo["normalizer"]} == {"standardize"}
    assert spec["student"]["stage_index"] == 0
    _check_matches_term(vit_ckpt, out)


def test_plain_export_of_an_adaptor_checkpoint_is_the_student_alone(cnn_ckpt, tmp_path):
    out = export_student(cnn_ckpt, tmp_path / "plain")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    module = DistillationModule.load_from_checkpoint(cnn_ckpt, map_location="cpu").eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = module.student(images).pooled  # a headless student's output
        assert torch.equal(model(module.student.preprocess(images)), expected)
    with pytest.raises(CheckpointError, match="lacks adaptors.safetensors, adaptors.json"):
        AgglomerativeStudent.from_export(out)


def test_export_with_adaptors_through_the_command(cnn_ckpt, tmp_path, capsys):
    out = tmp_path / "cmd"
    main(["export", cnn_ckpt, "--out", str(out), "--with_adaptors"])
    assert f"with its adaptor heads: {out}/adaptors.safetensors and" in capsys.readouterr().out
    assert AgglomerativeStudent.from_export(out).teacher_names == ["vit_tiny_patch16_224", "cnn"]


def test_onnx_export_with_adaptors(cnn_ckpt, tmp_path):
    """``agglomerative.onnx``: the student and its heads in one graph, outputs in each
    teacher's space, equal to the PyTorch loader's."""
    ort = pytest.importorskip("onnxruntime")
    out = export_student(cnn_ckpt, tmp_path / "onnx", format="onnx", with_adaptors=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "adaptors.json",
        "agglomerative.onnx",
        "config.json",
        "model.onnx",
    ]
    spec = json.loads((out / "adaptors.json").read_text())
    names = [o["name"] for o in spec["onnx"]["outputs"]]
    assert names == [
        "features",
        "vit_tiny_patch16_224.summary",
        "vit_tiny_patch16_224.spatial",
        "cnn.summary",
        "cnn.spatial",
    ]
    assert spec["onnx"]["outputs"][4]["shape"] == ["batch", 256, 2, 2]
    assert spec["onnx"]["check"]["max_abs_diff"] <= 1e-4
    assert spec["student"]["weights_file"] == "model.onnx"

    reference = AgglomerativeStudent.from_export(
        export_student(cnn_ckpt, tmp_path / "timm", with_adaptors=True)
    )
    x = reference.preprocess(torch.rand(2, 3, 32, 32))
    session = ort.InferenceSession(
        str(out / "agglomerative.onnx"), providers=["CPUExecutionProvider"]
    )
    got = dict(zip(names, session.run(names, {"input": x.numpy()}), strict=True))
    with torch.no_grad():
        expected = reference(x)
        features = reference.student_features(x)[0]
    torch.testing.assert_close(torch.from_numpy(got["features"]), features, atol=1e-4, rtol=0)
    for teacher, outputs in expected.items():
        for part, value in outputs.items():
            torch.testing.assert_close(
                torch.from_numpy(got[f"{teacher}.{part}"]), value, atol=1e-4, rtol=1e-4
            )
    with pytest.raises(CheckpointError, match="is an ONNX export: run agglomerative.onnx"):
        AgglomerativeStudent.from_export(out)


def _without_adaptor_term(checkpoint: str, path, keep_state: bool = False) -> str:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt.pop(KEY, None)  # its digest covers the tensors removed here
    ckpt["hyper_parameters"].pop("terms")
    if not keep_state:
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "terms." not in k}
    torch.save(ckpt, path)
    return str(path)


def test_refusals(cnn_ckpt, tmp_path):
    plain = _without_adaptor_term(cnn_ckpt, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="has no AdaptorHeads term"):
        export_student(plain, tmp_path / "a", with_adaptors=True)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    unknown = _without_adaptor_term(cnn_ckpt, tmp_path / "unknown.ckpt", keep_state=True)
    with pytest.raises(CheckpointError, match="do not record the terms' arguments"):
        export_student(unknown, tmp_path / "a", with_adaptors=True)
    with pytest.raises(ConfigError, match="not the adaptor heads"):
        export_student(cnn_ckpt, tmp_path / "a", push_to_hub="me/student", with_adaptors=True)

    # --overwrite of a folder with heads, without --with_adaptors, would orphan them.
    out = export_student(cnn_ckpt, tmp_path / "agg", with_adaptors=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="Pass --with_adaptors too"):
        export_student(plain, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export_student(cnn_ckpt, out, overwrite=True, with_adaptors=True)  # replaces all four

    # Heads beside another student's weights are refused by the loader.
    other = export_student(cnn_ckpt, tmp_path / "other", dtype="float16")
    shutil.copy(other / "model.safetensors", out / "model.safetensors")
    with pytest.raises(CheckpointError, match="mixes two exports"):
        AgglomerativeStudent.from_export(out)
    (out / "adaptors.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a visdistill adaptors file"):
        AgglomerativeStudent.from_export(out)
