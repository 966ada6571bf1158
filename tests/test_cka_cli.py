"""CKA: the (P, Q) minibatch estimator against NumPy, and `visdistill cka` end to end.

Complements tests/test_cka.py (pure functions, convergence, DDP, callback).
"""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_cka import np_hsic1  # the one NumPy reference of HSIC_1

from visdistill.commands import main
from visdistill.diagnostics import MinibatchCKA, hsic1, plot_cka
from visdistill.models import Backbone


def test_minibatch_matrix_matches_numpy_layer_by_layer():
    """Every (p, q) cell is sum_i HSIC1(K_ip, L_iq) / sqrt(sum_i HSIC1(K_ip, K_ip) ...)."""
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(3):
        base = rng.normal(size=(20, 6))
        layers_a = [base, np.tanh(base @ rng.normal(size=(6, 9)))]
        layers_b = [base**2, rng.normal(size=(20, 4)), base @ rng.normal(size=(6, 3))]
        batches.append((layers_a, layers_b))
    acc = MinibatchCKA(2, 3)
    for layers_a, layers_b in batches:
        acc.update([torch.tensor(x) for x in layers_a], [torch.tensor(y) for y in layers_b])
    got = acc.compute().numpy()

    s_ab, s_aa, s_bb = np.zeros((2, 3)), np.zeros(2), np.zeros(3)
    for layers_a, layers_b in batches:
        grams_a = [x @ x.T for x in layers_a]
        grams_b = [y @ y.T for y in layers_b]
        for p, k in enumerate(grams_a):
            s_aa[p] += np_hsic1(k, k)
            for q, m in enumerate(grams_b):
                s_ab[p, q] += np_hsic1(k, m)
        for q, m in enumerate(grams_b):
            s_bb[q] += np_hsic1(m, m)
    expected = s_ab / np.sqrt(s_aa[:, None] * s_bb[None, :])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_hsic1_feature_space_identity():
    """For column-centred X, Y: n(n-3) HSIC1 = tr(KL) - n/(n-2) d_K.d_L + tr K tr L/((n-1)(n-2)),
    so HSIC1 can also be computed from (p1 x p2) products when p << n."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 7))
    x, y = x - x.mean(0), y - y.mean(0)
    n = len(x)
    d_k, d_l = (x**2).sum(1), (y**2).sum(1)
    feature_form = (
        np.linalg.norm(y.T @ x) ** 2
        - n / (n - 2) * d_k @ d_l
        + d_k.sum() * d_l.sum() / ((n - 1) * (n - 2))
    ) / (n * (n - 3))
    gram_form = hsic1(torch.tensor(x @ x.T), torch.tensor(y @ y.T)).item()
    assert gram_form == pytest.approx(feature_form, rel=1e-9)


def test_hsic1_ignores_a_shift_of_all_features():
    """U-centring removes a common offset: shifting every example by the same vector (what
    a BatchNorm bias or ReLU mean does) leaves HSIC_1 unchanged."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    shifted = x + 10 * torch.randn(1, 8, generator=g, dtype=torch.float64)
    base = hsic1(x @ x.T, y @ y.T).item()
    assert hsic1(shifted @ shifted.T, y @ y.T).item() == pytest.approx(base, rel=1e-9)


def test_accumulator_state_does_not_grow_and_resets():
    acc = MinibatchCKA(2, 2)
    shapes = {k: v.shape for k, v in acc.state_dict().items()}
    for _ in range(20):
        feats = [torch.randn(8, 3, 2, 2), torch.randn(8, 5)]
        acc.update(feats, feats)
    assert {k: v.shape for k, v in acc.state_dict().items()} == shapes
    assert torch.allclose(acc.compute().diagonal(), torch.ones(2, dtype=torch.float64))
    acc.reset()
    assert all(not v.any() for v in acc.state_dict().values())


def test_plot_puts_model_a_on_the_y_axis_with_origin_lower(tmp_path):
    matrix = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=torch.float64)
    path = tmp_path / "m.png"
    fig = plot_cka(matrix, ["a0", "a1"], ["b0", "b1", "b2"], path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    image = ax.images[0]
    assert image.origin == "lower"
    assert image.get_array().shape == (2, 3)  # rows: model A
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a0", "a1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b0", "b1", "b2"]
    assert image.get_clim() == (0, 1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = Backbone("resnet10t", num_classes=10).model
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cka(*args):
    main(["cka", "--data", "digits", "--num-classes", "10", *args])


def test_command_same_model_twice_gives_a_unit_diagonal_in_csv(tmp_path, tiny_checkpoint):
    """The same weights on both sides: CKA(stage i, stage i) = 1 and the matrix is
    symmetric, which checks that rows and columns follow the requested stages."""
    out_csv = tmp_path / "cka.csv"
    _cka(
        "--model-a", "resnet10t", "--checkpoint-a", str(tiny_checkpoint),
        "--model-b", "resnet10t", "--checkpoint-b", str(tiny_checkpoint),
        "--layers-a", "0,2,4", "--layers-b", "0,2,4",
        "--num-samples", "128", "--batch-size", "64",
        "--out", str(tmp_path / "cka.png"), "--matrix", str(out_csv),
    )  # fmt: skip
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["", "0:act1", "2:layer2", "4:layer4"]
    assert [r[0] for r in rows[1:]] == ["0:act1", "2:layer2", "4:layer4"]
    m = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    np.testing.assert_allclose(m, m.T, atol=1e-6)
    assert ((m > 0) & (m <= 1 + 1e-6)).all()
    assert (tmp_path / "cka.png").stat().st_size > 1000


def test_command_vit_vs_cnn_json_shape(tmp_path):
    out = tmp_path / "cka.json"
    _cka(
        "--model-a", "vit_tiny_patch16_224",
        "--model-kwargs-a", '{"img_size": 32, "patch_size": 8, "depth": 2}',
        "--model-b", "resnet10t", "--layers-b", "1,3",
        "--num-samples", "64", "--batch-size", "32", "--epochs", "2",
        "--out", str(tmp_path / "cka.png"), "--matrix", str(out),
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2  # depth-2 ViT: one stage per block
    assert saved["cols"] == ["1:layer1", "3:layer3"]
    assert np.array(saved["cka"]).shape == (2, 2)
    assert np.isfinite(saved["cka"]).all()


def test_command_bad_stage_index_names_the_valid_stages(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _cka(
            "--model-a", "resnet10t", "--model-b", "resnet10t", "--layers-a", "0,9",
            "--num-samples", "64", "--batch-size", "32", "--out", str(tmp_path / "x.png"),
        )  # fmt: skip
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "[9]" in err and "4: layer4" in err
    assert not (tmp_path / "x.png").exists()


def test_command_missing_data_folder_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_images"
    with pytest.raises(SystemExit) as e:
        main(["cka", "--model-a", "resnet10t", "--model-b", "resnet10t", "--data", str(missing)])
    assert e.value.code == 1
    assert "no_such_images" in capsys.readouterr().err


def test_command_rejects_tiny_batches_and_unknown_matrix_suffix(tmp_path, capsys):
    for extra, message in [
        (["--batch-size", "3"], "needs at least 4 examples per batch"),
        (["--matrix", str(tmp_path / "m.txt")], "must end in .csv or .json"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["cka", "--model-a", "resnet10t", "--model-b", "resnet10t", "--data", "digits",
                  "--out", str(tmp_path / "x.png"), *extra])  # fmt: skip
        assert e.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()  # refused before any work


def test_command_reads_num_classes_from_the_exported_config(tmp_path):
    from visdistill import zoo

    weights = zoo.weights_path("fmnist_resnet10t")  # next to a config.json with 10 classes
    out = tmp_path / "m.json"
    main(["cka", "--model-a", "resnet10t", "--checkpoint-a", str(weights),
          "--model-b", "zoo:fmnist_convnext_atto", "--data", "digits", "--num-samples", "64",
          "--batch-size", "32", "--layers-a", "4", "--layers-b", "3",
          "--out", str(tmp_path / "x.png"), "--matrix", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == ["4:layer4"]


def _export_dir(tmp_path, checkpoint, **config):
    """A folder like `visdistill export` writes: model.safetensors + a timm config.json."""
    import shutil

    out = tmp_path / "export"
    out.mkdir()
    shutil.copy(checkpoint, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out / "model.safetensors"


def test_command_takes_architecture_and_num_classes_from_the_exported_config(
    tmp_path, tiny_checkpoint
):
    """No --model-a and no --num-classes: both come from the config.json beside the weights.
    An explicit --num-classes still wins over it."""
    weights = _export_dir(
        tmp_path,
        tiny_checkpoint,
        architecture="resnet10t",
        num_classes=10,
        model_args={},
        pretrained_cfg={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    )
    out = tmp_path / "m.json"
    base = ["cka", "--checkpoint-a", str(weights), "--model-b", "resnet10t", "--data", "digits",
            "--num-samples", "32", "--batch-size", "32", "--layers-a", "4", "--layers-b", "4",
            "--out", str(tmp_path / "x.png"), "--matrix", str(out)]  # fmt: skip
    main(base)
    assert json.loads(out.read_text())["rows"] == ["4:layer4"]
    # A config that disagrees with the weights' head: the explicit flag wins.
    (weights.parent / "config.json").write_text(
        json.dumps({"architecture": "resnet10t", "num_classes": 7})
    )
    with pytest.raises(SystemExit):
        main(base)
    main([*base, "--num-classes", "10"])
    assert json.loads(out.read_text())["cols"] == ["4:layer4"]


def test_command_without_model_or_config_is_explained(tmp_path, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cka", "--checkpoint-a", str(tiny_checkpoint), "--model-b", "resnet10t",
              "--data", "digits", "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "--model_a is required" in err and "config.json" in err
    assert not (tmp_path / "x.png").exists()


def test_matrix_suffix_is_case_insensitive_and_the_error_names_the_suffix(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cka", "--model-a", "resnet10t", "--model-b", "resnet10t", "--data", "digits",
              "--matrix", str(tmp_path / "m.TXT"), "--out", str(tmp_path / "x.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 1 and "'.TXT'" in err and ".csv or .json" in err
    from visdistill.diagnostics import save_cka
    from visdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="'.npy'.*use one of .csv, .json"):
        save_cka(torch.eye(1), ["a"], ["b"], tmp_path / "m.npy")
    save_cka(torch.eye(1, dtype=torch.float64), ["a"], ["b"], tmp_path / "M.CSV")
    assert (tmp_path / "M.CSV").read_text().splitlines() == [",b", "a,1.000000"]


def test_command_rejects_num_samples_below_one_batch_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cka", "--model-a", "no_such_model_xyz", "--model-b", "resnet10t",
              "--num-samples", "16", "--batch-size", "32", "--out", str(tmp_path / "x.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--num_samples 16" in err  # not the unknown model: no work done
