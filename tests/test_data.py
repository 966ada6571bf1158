import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from visdistill import (
    CIFARDataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
)
from visdistill.data import fashion_mnist


def test_digits_batches_are_canonical_with_indices():
    dm = DigitsDataModule(batch_size=16, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["target"].dtype == torch.int64 and batch["index"].shape == (16,)
    # The index points back at the source sample.
    j = int(batch["index"][0])
    assert torch.equal(dm.train_set.images[j].float().div(255).expand(3, -1, -1), batch["image"][0])


def test_validation_is_carved_from_train_and_seeded():
    a, b = DigitsDataModule(val_split=0.2, seed=3), DigitsDataModule(val_split=0.2, seed=3)
    a.setup("fit")
    b.setup("fit")
    train, val = set(a.train_set.indices.tolist()), set(a.val_set.indices.tolist())
    assert not train & val and len(val) == round(0.2 * (len(train) + len(val)))
    assert torch.equal(a.val_set.indices, b.val_set.indices)
    c = DigitsDataModule(val_split=100, train_subset=50)
    c.setup("fit")
    assert len(c.val_set) == 100 and len(c.train_set) == 50


def test_augmentation_only_on_train():
    dm = DigitsDataModule(augment=True)
    dm.setup("fit")
    assert dm.train_set.transform is not None and dm.val_set.transform is None


def _write_idx(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    header = (
        np.array([0, 0, 8, 3], np.uint8).tobytes()
        + np.array([len(images), 28, 28], ">i4").tobytes()
    )
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(
            np.array([0, 0, 8, 1], np.uint8).tobytes()
            + np.array([len(labels)], ">i4").tobytes()
            + labels.tobytes()
        )


def test_fashion_mnist_from_a_torchvision_root(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20, dtype=np.uint8)
    _write_idx(tmp_path / "FashionMNIST" / "raw", "train", images, labels)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_split=5, augment=False)
    dm.setup("fit")
    sample = dm.train_set[0]
    j = int(sample["index"])
    assert sample["image"].shape == (3, 32, 32)
    # Padded by 2 px, not resized: the 28x28 pixels are exact.
    assert torch.equal(
        (sample["image"][0, 2:30, 2:30] * 255).round().to(torch.uint8), torch.from_numpy(images[j])
    )
    assert sample["image"][:, :2].abs().sum() == 0
    assert int(sample["target"]) == labels[j]


def test_fashion_mnist_missing_says_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(
        DataNotFoundError, match="apt-get install dataset-fashion-mnist.*download: true"
    ):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")


@pytest.mark.skipif(
    not fashion_mnist.DEBIAN_DIR.exists(), reason="Debian dataset-fashion-mnist not installed"
)
def test_fashion_mnist_real_debian_files():
    dm = FashionMNISTDataModule(val_split=6000, test_subset=1000)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 54000 and len(dm.val_set) == 6000 and len(dm.test_set) == 1000
    counts = torch.bincount(dm.train_set.targets, minlength=10)
    assert counts.tolist() == [6000] * 10


def test_cifar_missing_is_explained(tmp_path):
    with pytest.raises(DataNotFoundError, match="download: true"):
        CIFARDataModule(root=str(tmp_path)).setup("fit")


def _make_folder(root, n_per_class=4):
    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (40, 30), colour).save(root / c / f"{i}.png")


def test_image_folder(tmp_path):
    _make_folder(tmp_path / "train")
    _make_folder(tmp_path / "test", 2)
    dm = ImageFolderDataModule(
        train_dir=str(tmp_path / "train"),
        test_dir=str(tmp_path / "test"),
        val_split=2,
        image_size=24,
    )
    assert dm.num_classes == 2
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2 and len(dm.test_set) == 4
    sample = dm.val_set[0]
    assert sample["image"].shape == (3, 24, 24) and sample["image"].max() <= 1.0
    red = sample["image"][:, 12, 12]
    assert torch.allclose(
        red,
        torch.tensor([1.0, 0.0, 0.0]) if sample["target"] == 0 else torch.tensor([0.0, 0.0, 1.0]),
    )


def test_image_folder_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no images"):
        ImageFolderDataModule(train_dir=str(tmp_path / "empty"))
    with pytest.raises(DataNotFoundError, match="not found"):
        ImageFolderDataModule(train_dir=str(tmp_path / "nowhere"))
    _make_folder(tmp_path / "train")
    (tmp_path / "train" / "cat" / "9.png").write_bytes(b"not a png")
    dm = ImageFolderDataModule(train_dir=str(tmp_path / "train"), val_split=0, augment=False)
    dm.setup("fit")
    broken = [
        i
        for i in range(len(dm.train_set))
        if dm.train_set.folder.samples[int(dm.train_set.indices[i])][0].endswith("9.png")
    ]
    with pytest.raises(DataNotFoundError, match="cannot read image .*9.png"):
        dm.train_set[broken[0]]


def test_train_subset_larger_than_the_data_warns(tmp_path):
    from visdistill.data.base import split_indices

    with pytest.warns(UserWarning, match="train_subset=500 is larger than the 90 training"):
        train, _ = split_indices(100, 10, seed=0, train_subset=500)
    assert len(train) == 90
    _make_folder(tmp_path / "train")
    _make_folder(tmp_path / "val", 1)
    dm = ImageFolderDataModule(
        train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), train_subset=50
    )
    with pytest.warns(UserWarning, match="train_subset=50 is larger than the 8"):
        dm.setup("fit")


def test_16_bit_pngs_scale_by_their_bit_depth(tmp_path):
    # Before: PIL's convert("RGB") clipped at 255, so 1000 and 30000 were both white.
    import numpy as np

    for c, value in (("dark", 1000), ("bright", 30000)):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((16, 16), value, dtype=np.uint16)).save(tmp_path / c / "0.png")
    dm = ImageFolderDataModule(train_dir=str(tmp_path), val_split=0, augment=False, image_size=8)
    dm.setup("fit")
    for i in range(2):
        sample = dm.train_set[i]
        value = 1000 if sample["target"] == dm.train_set.folder.class_to_idx["dark"] else 30000
        expected = round(value * 255 / 65535) / 255
        assert torch.allclose(sample["image"], torch.full((3, 8, 8), expected), atol=1e-6)


def test_split_folders_are_labelled_by_the_training_folders_class_names(tmp_path):
    """A test (or val) folder lacking a class keeps each class's training label: ImageFolder
    alone numbers the folders it finds, which shifted every later class by one, silently."""
    for c, colour in (("ant", (255, 0, 0)), ("bee", (0, 255, 0)), ("cat", (0, 0, 255))):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "train" / c / "0.png")
        Image.new("RGB", (8, 8), colour).save(tmp_path / "train" / c / "1.png")
    for split in ("val", "test"):
        for c, colour in (("ant", (255, 0, 0)), ("cat", (0, 0, 255))):  # no "bee"
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), colour).save(tmp_path / split / c / "0.png")
    dm = ImageFolderDataModule(
        train_dir=str(tmp_path / "train"),
        val_dir=str(tmp_path / "val"),
        test_dir=str(tmp_path / "test"),
        image_size=8,
        augment=False,
    )
    dm.setup("fit")
    dm.setup("test")
    for split in (dm.val_set, dm.test_set):
        labels = {
            int(split[i]["target"]): split[i]["image"][:, 4, 4].argmax().item() for i in (0, 1)
        }
        assert labels == {0: 0, 2: 2}  # ant -> 0 (red), cat -> 2 (blue), as in training

    (tmp_path / "test" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "dog" / "0.png")
    dm = ImageFolderDataModule(
        train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), image_size=8
    )
    with pytest.raises(DataNotFoundError, match="class folders the training folder lacks: dog"):
        dm.setup("test")
