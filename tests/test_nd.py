import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CNN, VIT

from visdistill import ND, ConfigError, DistillationModule, ModelConfig, TeacherEnsemble
from visdistill.losses import nd_loss
from visdistill.models import Backbone
from visdistill.terms.nd import EmbeddingProjector


def test_nd_matches_the_spec_example():
    # s = (3, 4), t = (10, 0), e = (1, 0): 1 - 3 / max(5, 10) = 0.7.
    loss = nd_loss(
        torch.tensor([[3.0, 4.0]]),
        torch.tensor([[10.0, 0.0]]),
        torch.tensor([[2.0, 0.0]]),
        torch.tensor([0]),
    )
    assert loss.item() == pytest.approx(0.7)


def test_direction_term_is_zero_when_parallel_to_the_class_mean():
    means = torch.tensor([[0.0, 3.0], [4.0, 4.0]])
    s = torch.tensor([[0.0, 7.0], [2.0, 2.0]])  # parallel to their class means
    t = torch.tensor([[1.0, 1.0], [0.5, 0.5]])  # teacher norms below the student's
    assert nd_loss(s, t, means, torch.tensor([0, 1])).abs().item() < 1e-6


def test_below_the_teacher_norm_the_gradient_grows_the_projection():
    s = torch.tensor([[3.0, 4.0]], requires_grad=True)
    nd_loss(
        s, torch.tensor([[10.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    ).backward()
    assert torch.allclose(s.grad, torch.tensor([[-0.1, 0.0]]))  # -e / ||t||


def test_soft_labels_mix_the_class_directions():
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s, t = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)
    mixed = nd_loss(s, t, means, torch.tensor([[0.5, 0.5]]))
    # e = 0.5 (1, 0) + 0.5 (0, 1) -> <s, e> = 1, ||s|| = sqrt(2).
    assert mixed.item() == pytest.approx(1 - 1 / 2**0.5, rel=1e-6)


def test_width_mismatch_without_projector_is_a_clear_error():
    with pytest.raises(ValueError, match="project the student"):
        nd_loss(torch.ones(2, 3), torch.ones(2, 4), torch.ones(5, 4), torch.tensor([0, 1]))


def _loader(n=40, k=10):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g)
    targets = torch.arange(n) % k
    return [{"image": images[i : i + 8], "target": targets[i : i + 8]} for i in range(0, n, 8)]


def test_class_means_are_per_class_averages_of_teacher_embeddings():
    teachers = TeacherEnsemble([ModelConfig(**CNN), ModelConfig(**VIT)])
    term = ND()
    term.setup(Backbone(**CNN), list(teachers))
    batches = _loader()
    means = term.compute_class_means(teachers, batches)
    images = torch.cat([b["image"] for b in batches])
    targets = torch.cat([b["target"] for b in batches])
    for m, teacher in enumerate(teachers):
        pooled = teacher(images, pooled=True).pooled
        expected = torch.stack([pooled[targets == c].mean(0) for c in range(10)])
        assert torch.allclose(means[m], expected, atol=1e-5)
    # Projector only where widths differ (resnet10t 512 vs vit 192).
    assert isinstance(term.projectors[0], torch.nn.Identity)
    assert isinstance(term.projectors[1], EmbeddingProjector)


def test_missing_class_and_wrong_shapes_are_refused():
    teachers = TeacherEnsemble([ModelConfig(**CNN)])
    term = ND()
    term.setup(Backbone(**CNN), list(teachers))
    only_zeros = [{"image": torch.rand(4, 3, 32, 32), "target": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(ConfigError, match=r"no training samples of class\(es\) \[1, 2"):
        term.compute_class_means(teachers, only_zeros)
    with pytest.raises(ConfigError, match="expected \\(10, 512\\)"):
        term.set_class_means([torch.zeros(10, 192)])
    with pytest.raises(ConfigError, match="class means are not set"):
        out = teachers[0](torch.rand(2, 3, 32, 32), pooled=True)
        term(out, [out], torch.tensor([0, 1]))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_means(rank, world, port, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    teachers = TeacherEnsemble([ModelConfig(**CNN)])
    term = ND()
    term.setup(Backbone(**CNN), list(teachers))
    out[rank] = term.compute_class_means(teachers, _loader()[rank::world])[0]
    dist.destroy_process_group()


def test_class_means_are_all_reduced_across_ranks():
    torch.manual_seed(0)
    teachers = TeacherEnsemble([ModelConfig(**CNN)])
    term = ND()
    term.setup(Backbone(**CNN), list(teachers))
    expected = term.compute_class_means(teachers, _loader())[0]
    out = mp.Manager().dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_means, args=(2, _free_port(), out), nprocs=2, join=True)
    assert torch.allclose(out[0], expected, atol=1e-5) and torch.equal(out[0], out[1])


def test_nd_gradients_reach_student_and_projector_only():
    module = DistillationModule(
        student=ModelConfig(**CNN), teachers=[ModelConfig(**VIT)], terms=[ND()]
    )
    term = module.terms[0]
    term.set_class_means([torch.randn(10, 192)])
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.tensor([0, 1, 2, 3])}
    loss, parts, _ = module.compute_losses(batch)
    loss.backward()
    assert "nd" in parts and torch.isfinite(parts["nd"])
    assert all(p.grad is not None for p in term.projectors.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())


def test_fit_computes_class_means_once_then_reuses_the_cache(tmp_path, monkeypatch):
    import lightning as L

    from visdistill import DigitsDataModule

    def fit(module):
        L.Trainer(
            max_epochs=1,
            limit_val_batches=1,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        ).fit(module, DigitsDataModule(batch_size=64, train_subset=128))

    def build():
        torch.manual_seed(0)  # same (random) teacher weights -> same cache key
        return DistillationModule(
            student=ModelConfig(**CNN),
            teachers=[ModelConfig(**VIT)],
            terms=[ND(cache_dir=str(tmp_path / "cache"))],
        )

    first = build()
    fit(first)
    files = list((tmp_path / "cache" / "class_means").glob("*.safetensors"))
    assert len(files) == 1 and bool(first.terms[0].means_ready)
    second = build()
    monkeypatch.setattr(ND, "compute_class_means", lambda *a, **k: pytest.fail("recomputed"))
    fit(second)
    assert torch.equal(second.terms[0].class_means()[0], first.terms[0].class_means()[0])


def test_cache_key_changes_with_teacher_weights_and_data():
    from visdistill import DigitsDataModule
    from visdistill.terms.nd import class_means_key

    torch.manual_seed(0)
    a = TeacherEnsemble([ModelConfig(**VIT)])
    torch.manual_seed(0)
    same = TeacherEnsemble([ModelConfig(**VIT)])
    torch.manual_seed(1)
    other = TeacherEnsemble([ModelConfig(**VIT)])
    dm = DigitsDataModule(train_subset=300)
    key = class_means_key(a, dm, 300, True)
    assert key == class_means_key(same, dm, 300, True)
    assert key != class_means_key(other, dm, 300, True)
    assert key != class_means_key(a, DigitsDataModule(train_subset=200), 300, True)
    assert key != class_means_key(a, dm, 300, False)


@pytest.mark.parametrize("limit", [dict(fast_dev_run=2), dict(limit_train_batches=3)])
def test_shortened_runs_shorten_the_class_means_pass_and_do_not_cache_it(
    tmp_path, monkeypatch, limit
):
    # Before: the means pass ran over the whole training set whatever fast_dev_run said.
    import lightning as L

    import visdistill.terms.nd as nd_module
    from visdistill import DigitsDataModule

    seen = []
    original = nd_module.run_over_loader

    def counting(*args, **kwargs):  # the batches the means pass really runs
        passes = list(original(*args, **kwargs))
        seen.append(len(passes))
        yield from passes

    monkeypatch.setattr(nd_module, "run_over_loader", counting)
    module = DistillationModule(
        student=ModelConfig(**CNN),
        teachers=[ModelConfig(**CNN)],
        terms=[ND(cache_dir=str(tmp_path / "cache"))],
    )
    trainer = L.Trainer(
        max_epochs=1, limit_val_batches=0, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path, **limit,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"ND class means from \d+ of \d+ batches"):
        trainer.fit(module, DigitsDataModule(batch_size=16))
    assert seen == [next(iter(limit.values()))]
    assert bool(module.terms[0].means_ready)
    assert all(torch.isfinite(m).all() for m in module.terms[0].class_means())
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_unaugmented_class_means_on_an_image_folder_use_its_eval_transform(tmp_path):
    """ND(augmented=False) on an image folder: the images still need decoding and resizing,
    so the training set's transform is replaced by the data module's eval transform (it was
    set to None, and the PIL images failed to collate)."""
    import lightning as L
    from PIL import Image
    from torch.utils.data import DataLoader

    from visdistill import ImageFolderDataModule

    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 256, (40, 36, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "train" / c / f"{i}.png")

    def fit(seed: int) -> DistillationModule:
        torch.manual_seed(0)
        module = DistillationModule(
            student=ModelConfig(**{**CNN, "num_classes": 2}),
            teachers=[ModelConfig(**{**VIT, "num_classes": 2})],
            terms=[ND(augmented=False, cache_dir="")],
        )
        dm = ImageFolderDataModule(
            train_dir=str(tmp_path / "train"), val_split=0, image_size=32, batch_size=4, seed=seed
        )
        L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        ).fit(module, dm)
        return module

    first, second = fit(seed=0), fit(seed=1)  # other augmentation draws, same means
    means = first.terms[0].class_means()[0]
    assert torch.equal(means, second.terms[0].class_means()[0])
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_split=0, image_size=32)
    dm.setup("fit")
    dm.train_set.transform = dm.eval_transform()  # what the pass must have seen
    reference = first.terms[0].compute_class_means(
        first.teachers, DataLoader(dm.train_set, batch_size=5)
    )[0]
    torch.testing.assert_close(means, reference, rtol=1e-5, atol=1e-6)
