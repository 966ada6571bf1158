"""CKA against a plain NumPy implementation of the formulas, invariances, and the minibatch estimator."""

import json

import numpy as np
import pytest
import torch

from visdistill.cli import main
from visdistill.diagnostics import MinibatchCKA, gram_linear, hsic1, linear_cka, rbf_cka


def np_center(k, unbiased):
    k = k.copy()
    n = len(k)
    if not unbiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return h @ k @ h
    np.fill_diagonal(k, 0)
    means = k.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    k -= means[:, None] + means[None, :]
    np.fill_diagonal(k, 0)
    return k


def np_cka(k, m, unbiased=False):
    kc, lc = np_center(k, unbiased), np_center(m, unbiased)
    return (kc * lc).sum() / (np.linalg.norm(kc) * np.linalg.norm(lc))


def np_rbf(x, frac):
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * frac**2 * np.median(d2)))


def np_hsic1(k, m):
    n = len(k)
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    one = np.ones(n)
    return (
        np.trace(k @ m)
        + one @ k @ one * (one @ m @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ k @ m @ one
    ) / (n * (n - 3))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(40, 7))
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_and_rbf_match_numpy(xy, debiased):
    x, y = xy
    expected = np_cka(x @ x.T, y @ y.T, debiased)
    assert linear_cka(torch.tensor(x), torch.tensor(y), debiased).item() == pytest.approx(
        expected, abs=1e-5
    )
    expected = np_cka(np_rbf(x, 0.5), np_rbf(y, 0.5), debiased)
    assert rbf_cka(torch.tensor(x), torch.tensor(y), 0.5, debiased).item() == pytest.approx(
        expected, abs=1e-5
    )


def test_hsic1_matches_numpy_and_the_u_centred_identity(xy):
    x, y = xy
    k, m = x @ x.T, y @ y.T
    value = hsic1(torch.tensor(k), torch.tensor(m)).item()
    assert value == pytest.approx(np_hsic1(k, m), rel=1e-8)
    n = len(k)
    assert value == pytest.approx(
        (np_center(k, True) * np_center(m, True)).sum() / (n * (n - 3)), rel=1e-8
    )


def test_feature_form_equals_gram_form(xy):
    x, y = xy
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert linear_cka(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(
        feature_form, abs=1e-10
    )


def test_invariances(xy):
    x, y = (torch.tensor(a) for a in xy)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y).item() == pytest.approx(base.item(), abs=1e-10)
    assert linear_cka(3.7 * x, y).item() == pytest.approx(base.item(), abs=1e-10)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    maps = torch.randn(16, 4, 3, 3)  # (n, C, H, W) is flattened
    assert linear_cka(maps, maps.flatten(1)).item() == pytest.approx(1.0, abs=1e-12)


def test_minibatch_estimate_converges_to_full_debiased_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(32, 16, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        4096, 16, generator=g, dtype=torch.float64
    )
    acc = MinibatchCKA(1, 1)
    for i in range(0, 4096, 256):
        acc.update([x[i : i + 256]], [y[i : i + 256]])
    full = linear_cka(x, y, debiased=True).item()
    assert acc.compute().item() == pytest.approx(full, abs=0.02)
    # Matrix shape and self-similarity on the diagonal of an A-vs-A map.
    acc2 = MinibatchCKA(2, 2)
    acc2.update([x[:64], y[:64]], [x[:64], y[:64]])
    m = acc2.compute()
    assert m.shape == (2, 2) and torch.allclose(m.diagonal(), torch.ones(2, dtype=torch.float64))


def test_small_batches_are_refused():
    with pytest.raises(ValueError, match="more than 3"):
        MinibatchCKA(1, 1).update([torch.randn(3, 4)], [torch.randn(3, 4)])
    with pytest.raises(ValueError, match="more than 3"):
        hsic1(torch.eye(3), torch.eye(3))


def test_gram_linear_flattens_maps():
    x = torch.randn(5, 2, 3, 3)
    assert torch.allclose(gram_linear(x), (x.flatten(1) @ x.flatten(1).T).double())


def test_cka_command_writes_png_and_matrix(tmp_path, capsys):
    png, js = tmp_path / "cka.png", tmp_path / "cka.json"
    main(
        [
            "cka",
            "--model-a",
            "resnet10t",
            "--model-b",
            "vit_tiny_patch16_224",
            "--model-kwargs-b",
            '{"img_size": 32, "patch_size": 8, "depth": 2}',
            "--num-classes",
            "10",
            "--data",
            "digits",
            "--num-samples",
            "64",
            "--batch-size",
            "32",
            "--layers-a",
            "1,2,4",
            "--out",
            str(png),
            "--matrix",
            str(js),
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(js.read_text())
    assert len(saved["rows"]) == 3 and len(saved["cols"]) == 2
    assert (
        np.array(saved["cka"]).shape == (3, 2)
        and np.min(saved["cka"]) >= 0
        and np.max(saved["cka"]) <= 1 + 1e-9
    )
    assert saved["rows"][0] == "1:layer1"


def test_cka_command_bad_data_is_explained(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "cka",
                "--model-a",
                "resnet10t",
                "--model-b",
                "resnet10t",
                "--data",
                str(tmp_path / "nope"),
            ]
        )
    assert e.value.code == 1


def test_callback_logs_student_teacher_cka(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from visdistill import DigitsDataModule, DistillationModule, ModelConfig
    from visdistill.diagnostics import CKACallback

    module = DistillationModule(
        student=ModelConfig("resnet10t", num_classes=10),
        teachers=[ModelConfig("convnext_atto", num_classes=10)],
    )
    callback = CKACallback(
        num_samples=64, batch_size=32, student_stages=(2, 4), teacher_stages=(0, 3)
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert {"cka/s2_t0", "cka/s4_t3"} <= set(trainer.logged_metrics)
    assert callback.last_matrix.shape == (2, 2)
    assert ((callback.last_matrix >= 0) & (callback.last_matrix <= 1 + 1e-9)).all()
    assert list(tmp_path.rglob("events.out.tfevents*"))


def _ddp_worker(rank, world, port, x, y, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    acc = MinibatchCKA(2, 1)
    for i in range(rank * 64, 512, world * 64):  # each rank sees every other batch
        acc.update([x[i : i + 64], x[i : i + 64] ** 2], [y[i : i + 64]])
    out[rank] = acc.compute()
    dist.destroy_process_group()


def test_accumulator_all_reduces_under_ddp():
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 8, generator=g), torch.randn(512, 5, generator=g)
    single = MinibatchCKA(2, 1)
    for i in range(0, 512, 64):
        single.update([x[i : i + 64], x[i : i + 64] ** 2], [y[i : i + 64]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, x, y, out), nprocs=2, join=True)
    expected = single.compute()
    assert torch.allclose(out[0], expected, atol=1e-12) and torch.allclose(
        out[1], expected, atol=1e-12
    )


def _ddp_idle_rank_worker(rank, world, port, x, y, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    acc = MinibatchCKA(1, 1)
    if rank == 0:  # rank 1 gets no batch at all
        acc.update([x[:64]], [y[:64]])
    out[rank] = acc.compute()
    dist.destroy_process_group()


def test_a_rank_without_batches_does_not_hang_the_others():
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 5, generator=g)
    single = MinibatchCKA(1, 1)
    single.update([x], [y])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_idle_rank_worker, args=(2, port, x, y, out), nprocs=2, join=True)
    assert torch.allclose(out[0], single.compute()) and torch.equal(out[0], out[1])


def test_accumulator_is_a_torchmetrics_metric_whose_states_sum():
    """The states reduce by sum (what DDP synchronisation applies): two accumulators that
    saw disjoint batches, merged, give the matrix of one that saw them all."""
    import torchmetrics

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(256, 8, generator=g), torch.randn(256, 5, generator=g)
    single, first, second = MinibatchCKA(2, 1), MinibatchCKA(2, 1), MinibatchCKA(2, 1)
    assert isinstance(single, torchmetrics.Metric)
    for i in range(0, 256, 64):
        feats = ([x[i : i + 64], x[i : i + 64].tanh()], [y[i : i + 64] + x[i : i + 64, :5]])
        single.update(*feats)
        (first if i < 128 else second).update(*feats)
    first.merge_state(second)
    assert torch.equal(first.batches, single.batches) and first.batches == 4
    assert torch.allclose(first.compute(), single.compute(), rtol=0, atol=1e-12)
    single.reset()
    assert single.batches == 0 and not single.s_ab.any()


def test_compute_without_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="saw no batches"):
        MinibatchCKA(2, 2).compute()


def test_callback_uses_a_fixed_random_validation_subset_and_warns_without_teachers():
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from visdistill.diagnostics import CKACallback

    class SortedByClass(Dataset):  # like an image folder: class 0 first, then class 1 ...
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 8, 8), "target": torch.tensor(i // 100)}

    class FakeTrainer:
        datamodule, global_rank, world_size = None, 0, 1
        val_dataloaders = DataLoader(SortedByClass(), batch_size=50)

    callback = CKACallback(num_samples=100, batch_size=25, seed=3)
    first = [b["target"] for b in callback.subset_loader(FakeTrainer())]
    again = [b["target"] for b in callback.subset_loader(FakeTrainer())]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(torch.cat(first).unique()) == 10  # every class, not just the first batches'
    assert sum(len(t) for t in first) == 100

    class NoTeachers(L.LightningModule):
        teachers = None

    class Sanity:
        sanity_checking, current_epoch = False, 0

    with pytest.warns(UserWarning, match="needs a teacher"):
        callback.on_validation_epoch_end(Sanity(), NoTeachers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only: a second warning would raise
        callback.on_validation_epoch_end(Sanity(), NoTeachers())


def test_plot_does_not_switch_the_matplotlib_backend(tmp_path):
    """In a fresh process whose backend is not Agg: plot_cka must leave it alone (it used to
    call matplotlib.use("Agg"))."""
    import subprocess
    import sys

    png = tmp_path / "x.png"
    code = (
        "import matplotlib, torch\n"
        "matplotlib.use('svg')\n"
        "from visdistill.diagnostics import plot_cka\n"
        f"plot_cka(torch.eye(2, dtype=torch.float64), ['a', 'b'], ['c', 'd'], {str(png)!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _SortedByClass(torch.utils.data.Dataset):
    """Like an image folder: 100 examples of class 0, then 100 of class 1, ..."""

    def __init__(self, n=1000):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "image": torch.full((3, 8, 8), i / self.n),
            "target": torch.tensor(i * 10 // self.n),
        }


def _fake_trainer(dataset, rank=0, world=1, batch_size=50):
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    return SimpleNamespace(
        datamodule=None,
        global_rank=rank,
        world_size=world,
        val_dataloaders=DataLoader(dataset, batch_size=batch_size),
        sanity_checking=False,
        current_epoch=0,
        logger=None,
    )


def test_callback_subset_batches_mix_classes():
    """Each CKA batch is a random draw: per-batch HSIC_1 on class-sorted batches would only
    see within-class structure."""
    from visdistill.diagnostics import CKACallback

    callback = CKACallback(num_samples=100, batch_size=25, seed=3)
    for batch in callback.subset_loader(_fake_trainer(_SortedByClass())):
        assert len(batch["target"].unique()) >= 6


def test_callback_subset_smaller_dataset_and_short_tail():
    """A validation set smaller than num_samples is used whole; a 1-3 example tail (which
    HSIC_1 cannot use) is dropped up front; under DDP the ranks take whole batches of the
    one-process batching, in turn."""
    from visdistill.diagnostics import CKACallback

    callback = CKACallback(num_samples=512, batch_size=8, seed=0)
    sizes = [len(b["target"]) for b in callback.subset_loader(_fake_trainer(_SortedByClass(30)))]
    assert sizes == [8, 8, 8, 6]
    sizes = [len(b["target"]) for b in callback.subset_loader(_fake_trainer(_SortedByClass(27)))]
    assert sizes == [8, 8, 8]

    def ids(trainer):
        return [b["image"][:, 0, 0, 0].tolist() for b in callback.subset_loader(trainer)]

    one = ids(_fake_trainer(_SortedByClass(40)))
    shares = [ids(_fake_trainer(_SortedByClass(40), r, 2)) for r in (0, 1)]
    assert len(one) == 5 and shares == [one[0::2], one[1::2]]


def test_callback_warns_at_setup_when_the_module_has_no_teacher():
    """Also for a LightningModule without a ``teachers`` attribute at all, and only once."""
    import warnings

    import lightning as L

    from visdistill.diagnostics import CKACallback

    callback = CKACallback()
    trainer = _fake_trainer(_SortedByClass(8))
    with pytest.warns(UserWarning, match="needs a teacher.*disabled"):
        callback.setup(trainer, L.LightningModule(), "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_validation_epoch_end(trainer, L.LightningModule())
    assert callback.last_matrix is None


@pytest.fixture(scope="module")
def tiny_module():
    from visdistill import DistillationModule, ModelConfig

    return DistillationModule(
        student=ModelConfig("resnet10t", num_classes=10),
        teachers=[ModelConfig("resnet10t", num_classes=10)],
    )


def test_callback_with_too_few_validation_samples_warns_instead_of_failing(tiny_module):
    from visdistill.diagnostics import CKACallback

    callback = CKACallback(batch_size=4, student_stages=(1,), teacher_stages=(1,))
    with pytest.warns(UserWarning, match="CKACallback skipped epoch 0.*no batches"):
        callback.on_validation_epoch_end(_fake_trainer(_SortedByClass(3)), tiny_module)
    assert callback.last_matrix is None


def test_cka_matrix_skips_short_batches_with_a_note(tiny_module):
    from torch.utils.data import DataLoader, Subset

    from visdistill.diagnostics import cka_matrix

    data = [{"image": torch.rand(3, 16, 16)} for _ in range(18)]
    student, teacher = tiny_module.student, tiny_module.teachers[0]
    with pytest.warns(UserWarning, match=r"skipped 1 batch.*sizes \[2\].*needs 4"):
        got, _, _ = cka_matrix(student, teacher, DataLoader(data, batch_size=8), progress=False)
    full, _, _ = cka_matrix(
        student, teacher, DataLoader(Subset(data, range(16)), batch_size=8), progress=False
    )
    assert torch.equal(got, full)


def _ddp_callback_worker(rank, world, port, module, out):
    import torch.distributed as dist

    from visdistill.diagnostics import CKACallback

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, (value, kw))
    callback = CKACallback(num_samples=7, batch_size=4, student_stages=(1, 2), teacher_stages=(3,))
    # 7 samples: rank 0 gets 4 (one batch), rank 1 gets 3 (none): it must still join the
    # all-reduce, and both ranks must end with the same matrix.
    callback.on_validation_epoch_end(_fake_trainer(_SortedByClass(50), rank, world), module)
    out[rank] = (callback.last_matrix, logged)
    dist.destroy_process_group()


def test_callback_under_ddp_with_an_idle_rank(tiny_module):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_callback_worker, args=(2, port, tiny_module, out), nprocs=2, join=True)
    (m0, log0), (m1, log1) = out[0], out[1]
    assert m0.shape == (2, 1) and torch.isfinite(m0).all() and torch.equal(m0, m1)
    assert log0 == log1 and set(log0) == {"cka/s1_t3", "cka/s2_t3"}
    # Same value on every rank: sync_dist=True is a no-op mean, and it keeps Lightning from
    # warning "use sync_dist=True when logging on epoch level in distributed setting".
    assert all(kw.get("sync_dist") is True for _, kw in log0.values())


def test_float32_update_matches_float64_reference_on_wide_offset_features():
    """Float32 Grams of batch-centred 4096-d ReLU features (large common offset) give the
    float64 NumPy HSIC_1 CKA to within 1e-5."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 128, 32, generator=g, dtype=torch.float64)

    def layer(scale):
        w = torch.randn(32, 4096, generator=g, dtype=torch.float64) * scale
        noise = torch.randn(2, 128, 4096, generator=g, dtype=torch.float64)
        return torch.relu(base @ w + noise) + 3.0  # (batches, m, d)

    feats_a, feats_b = [layer(0.2), layer(1.0)], [layer(0.5), layer(2.0), layer(0.1)]
    acc = MinibatchCKA(2, 3)
    for i in range(2):
        acc.update([f[i].float() for f in feats_a], [f[i].float() for f in feats_b])
    s_ab, s_aa, s_bb = np.zeros((2, 3)), np.zeros(2), np.zeros(3)
    for i in range(2):
        ka = [(f[i] @ f[i].T).numpy() for f in feats_a]
        kb = [(f[i] @ f[i].T).numpy() for f in feats_b]
        for p, k in enumerate(ka):
            s_aa[p] += np_hsic1(k, k)
            for q, m in enumerate(kb):
                s_ab[p, q] += np_hsic1(k, m)
        for q, m in enumerate(kb):
            s_bb[q] += np_hsic1(m, m)
    expected = s_ab / np.sqrt(s_aa[:, None] * s_bb[None, :])
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=0, atol=1e-7)
