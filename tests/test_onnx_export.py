"""Export: ONNX graphs checked with onnxruntime against PyTorch (CNN, ViT and MLP students),
the timm folder written with timm's config writer, and the Hugging Face Hub refusals."""

import json

import lightning as L
import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import CNN, MLP, VIT
from torch import nn

from visdistill import DigitsDataModule, DistillationModule, ModelConfig
from visdistill.errors import CheckpointError, ConfigError
from visdistill.export import ExportError, export_student, write_onnx

ARCHS = {"cnn": CNN, "vit": VIT, "mlp": MLP}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``fitted(arch) -> (checkpoint, module)``: one training step on digits per family,
    fitted on first use and shared by the tests of this file."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            module = DistillationModule(student=ModelConfig(**ARCHS[arch]))
            trainer = L.Trainer(
                fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=root,
            )  # fmt: skip
            trainer.fit(module, DigitsDataModule(batch_size=8))
            trainer.save_checkpoint(root / "m.ckpt")
            cache[arch] = root / "m.ckpt", module.eval()
        return cache[arch]

    return get


def _preprocess(images, pretrained_cfg):
    """What a user does from config.json alone: normalise ``[0, 1]`` images at input_size."""
    assert list(images.shape[1:]) == pretrained_cfg["input_size"]
    mean = torch.tensor(pretrained_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pretrained_cfg["std"]).view(1, -1, 1, 1)
    return (images - mean) / std


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(fitted, arch, tmp_path):
    checkpoint, module = fitted(arch)
    out = export_student(checkpoint, tmp_path / "onnx", format="onnx")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx"]
    config = json.loads((out / "config.json").read_text())
    onnx_cfg, pretrained_cfg = config["onnx"], config["pretrained_cfg"]
    assert onnx_cfg["check"]["exporter"] == "dynamo"  # the default exporter handles all three
    assert 0 <= onnx_cfg["check"]["max_abs_diff"] <= 1e-4 == onnx_cfg["check"]["atol"]
    assert onnx_cfg["input"] == {"name": "input", "shape": ["batch", 3, 32, 32]}
    assert onnx_cfg["output"] == {"name": "logits", "shape": ["batch", 10]}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    images = torch.rand(5, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        expected = module(images)  # the student's logits, preprocessing included
    got = session.run(["logits"], {"input": _preprocess(images, pretrained_cfg).numpy()})[0]
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_timm_folder_loads_in_plain_timm_with_identical_outputs(fitted, arch, tmp_path):
    checkpoint, module = fitted(arch)
    out = export_student(checkpoint, tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    # timm's own layout; the published weights' tag does not describe the student's.
    assert config["architecture"] == ARCHS[arch]["name"] and config["num_classes"] == 10
    assert "tag" not in config["pretrained_cfg"] and "onnx" not in config
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = module(images)
        got = loaded(_preprocess(images, config["pretrained_cfg"]))
    assert torch.equal(got, expected)


def test_a_failed_onnx_check_writes_nothing_and_keeps_the_earlier_export(fitted, tmp_path):
    checkpoint, _ = fitted("vit")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    (out / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # float32 ViT: onnxruntime and PyTorch differ by ~1e-7, far above 1e-12.
    with pytest.raises(ExportError, match=r"differs from PyTorch by up to .* \(allowed: 1e-12\)"):
        export_student(checkpoint, out, format="onnx", overwrite=True, onnx_atol=1e-12)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left


def test_onnx_refusals_come_before_any_file_is_written(fitted, tmp_path):
    checkpoint, _ = fitted("cnn")
    with pytest.raises(ConfigError, match=r"ONNX export writes float32 .*--format timm"):
        export_student(checkpoint, tmp_path / "a", dtype="float16", format="onnx")
    with pytest.raises(ConfigError, match="uploads the timm folder"):
        export_student(checkpoint, tmp_path / "a", format="onnx", push_to_hub="me/student")
    with pytest.raises(ConfigError, match="format must be one of timm, onnx"):
        export_student(checkpoint, tmp_path / "a", format="tflite")
    with pytest.raises(ConfigError, match="onnx_atol must be positive"):
        export_student(checkpoint, tmp_path / "a", format="onnx", onnx_atol=0.0)
    assert not (tmp_path / "a").exists()
    # A folder with the other format's weights: the new config.json would not describe them.
    both = export_student(checkpoint, tmp_path / "both")
    with pytest.raises(CheckpointError, match="holds model.safetensors from an earlier export"):
        export_student(checkpoint, both, format="onnx", overwrite=True)
    with pytest.raises(CheckpointError, match="replace its model.onnx and config.json"):
        export_student(checkpoint, both, format="onnx")
    assert sorted(p.name for p in both.iterdir()) == ["config.json", "model.safetensors"]


def test_export_command_takes_format_onnx(fitted, tmp_path):
    from visdistill.cli import main

    checkpoint, _ = fitted("cnn")
    main(["export", str(checkpoint), "--out", str(tmp_path / "o"), "--format", "onnx"])
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (tmp_path / "o" / "model.onnx").is_file() and config["onnx"]["check"]["atol"] == 1e-4


class _DataDependentBranch(nn.Module):
    """``torch.export`` cannot trace a branch on a tensor's value; TorchScript tracing
    records the branch taken, which here computes the same as the other one."""

    def forward(self, x):
        if x.sum() > 0:
            return torch.relu(x)
        return x.clamp(min=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the branch, as intended
def test_onnx_falls_back_to_the_torchscript_exporter_and_says_why(tmp_path):
    with pytest.warns(UserWarning, match="the dynamo ONNX exporter failed"):
        check = write_onnx(_DataDependentBranch(), tmp_path / "m.onnx", torch.randn(2, 3), "y")
    assert check.exporter == "torchscript" and check.fallback_reason
    assert check.max_abs_diff == 0 and check.batch_sizes == (1, 3)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = -torch.rand(4, 3)  # the branch not taken while tracing
    np.testing.assert_array_equal(session.run(["y"], {"input": x.numpy()})[0], np.zeros((4, 3)))


# --------------------------------------------------------------------- Hugging Face Hub
# A push needs the network and a token; these tests check only the refusals, which come
# before the checkpoint is read (it does not exist here) and before anything is written.
def test_push_to_hub_refuses_a_malformed_repo_id(tmp_path):
    with pytest.raises(ConfigError, match="is not a Hugging Face repo id"):
        export_student(tmp_path / "no.ckpt", tmp_path / "out", push_to_hub="me/two words")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_refuses_offline_mode_and_a_missing_token(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="needs the network, but HF_HUB_OFFLINE is set"):
        export_student(tmp_path / "no.ckpt", tmp_path / "out", push_to_hub="me/student")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match="needs a Hugging Face token with write access"):
        export_student(tmp_path / "no.ckpt", tmp_path / "out", push_to_hub="me/student")
    assert not (tmp_path / "out").exists()
