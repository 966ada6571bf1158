"""timm's augmentation configured by timm's names in the YAML: the transforms are timm's own
objects with the configured parameters, erasing is timm's in the student's normalisation,
and evaluation is deterministic."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode

from visdistill.data import ImageFolderDataModule, VisionDataModule, timm_transform
from visdistill.data.augment import Denormalize
from visdistill.errors import ConfigError


def _photo() -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0]).resize((96, 64))


def _folder(root):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _photo().rotate(40 * i).save(root / c / f"{i}.png")
    return root


def _from_yaml(text: str) -> VisionDataModule:
    """The data module a LightningCLI YAML's ``data:`` section builds."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(VisionDataModule, "data")
    cfg = parser.parse_object(yaml.safe_load(text))
    return parser.instantiate_classes(cfg).data


def test_yaml_with_timm_names_builds_timm_s_transforms(tmp_path):
    dm = _from_yaml(f"""
data:
  class_path: visdistill.ImageFolderDataModule
  init_args:
    train_dir: {_folder(tmp_path / "train")}
    image_size: 32
    val_split: 2
    scale: [0.25, 1.0]
    ratio: [0.8, 1.25]
    hflip: 0.3
    vflip: 0.1
    auto_augment: rand-m9-mstd0.5
    re_prob: 0.25
    re_mode: pixel
    re_count: 2
    interpolation: bicubic
    crop_pct: 0.9
""")
    assert isinstance(dm, ImageFolderDataModule)
    dm.setup("fit")
    steps = dm._transform(train=True).transforms  # what the training samples go through
    assert [type(s).__name__ for s in steps] == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandAugment",  # timm drops colour jitter under auto_augment
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
        "Denormalize",
    ]
    crop, hflip, vflip, rand_augment, _, _, erasing, _ = steps
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.size == (32, 32) and crop.scale == (0.25, 1.0) and crop.ratio == (0.8, 1.25)
    assert crop.interpolation == str_to_interp_mode("bicubic")
    assert hflip.p == 0.3 and vflip.p == 0.1
    assert isinstance(rand_augment, RandAugment) and rand_augment.num_layers == 2
    assert {op.magnitude for op in rand_augment.ops} == {9}
    assert {op.magnitude_std for op in rand_augment.ops} == {0.5}
    # RandAugment fills with the (ImageNet default) mean colour, as timm computes it.
    assert rand_augment.ops[0].hparams["img_mean"] == (124, 116, 104)
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 2)

    # Evaluation: resize to 32 / 0.9, centre crop, no randomness.
    val = dm.val_set.transform.transforms
    assert [type(s).__name__ for s in val[:2]] == ["Resize", "CenterCrop"]
    assert val[0].size == 35 and val[0].interpolation == str_to_interp_mode("bicubic")
    first, second = dm.val_set[0]["image"], dm.val_set[0]["image"]
    assert first.shape == (3, 32, 32) and torch.equal(first, second)
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_defaults_are_timm_s():
    train = timm_transform(True, 48).transforms
    assert [type(s).__name__ for s in train] == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "ColorJitter",
        "MaybePILToTensor",
        "ConvertImageDtype",
    ]
    assert train[0].scale == (0.08, 1.0) and train[1].p == 0.5
    assert train[2].brightness == (0.6, 1.4)  # color_jitter 0.4
    assert timm_transform(False, 48).transforms[0].size == int(48 / 0.875)
    # augment: false trains on the deterministic eval transform.
    assert repr(timm_transform(True, 48, augment=False)) == repr(timm_transform(False, 48))
    assert "ColorJitter" not in repr(timm_transform(True, 48, color_jitter=None))


def _seed(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)  # timm draws from all


@pytest.mark.parametrize("mode", ["const", "pixel"])
def test_erasing_is_timm_s_in_the_students_normalisation(mode):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    options = dict(re_prob=1.0, re_mode=mode, auto_augment="rand-m9-mstd0.5", scale=(0.5, 1.0))
    ours = timm_transform(True, 32, mean=mean, std=std, **options)
    timm = create_transform(32, is_training=True, mean=mean, std=std, **options)
    photo = _photo()
    for seed in range(3):
        _seed(seed)
        canonical = ours(photo)
        _seed(seed)
        expected = timm(photo)
        # The student normalising our canonical image gets exactly timm's tensor.
        normalised = (canonical - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
            :, None, None
        ]
        assert torch.allclose(normalised, expected, atol=1e-5)
        if mode == "const":  # erased pixels hold the mean colour, in [0, 1]
            erased = (expected == 0).all(0)
            assert erased.any()
            assert torch.allclose(canonical[:, erased], torch.tensor(mean)[:, None], atol=1e-6)


def test_normalisation_follows_the_student_s_input_spec(tmp_path):
    dm = ImageFolderDataModule(str(_folder(tmp_path / "train")), image_size=32, re_prob=0.5,
                               auto_augment="rand-m7")  # fmt: skip
    spec = SimpleNamespace(mean=(0.5,), std=(0.5,))  # a grayscale student's spec
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(student=SimpleNamespace(
        input_spec=spec)))  # fmt: skip
    assert dm.normalisation() == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    steps = dm._transform(train=True).transforms
    denormalize = steps[-1]
    assert isinstance(denormalize, Denormalize)
    assert denormalize.mean.flatten().tolist() == [0.5] * 3
    rand_augment = next(s for s in steps if isinstance(s, RandAugment))
    assert rand_augment.ops[0].hparams["img_mean"] == (128, 128, 128)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"auto_augment": "bogus-m9"}, "timm cannot build the train transform"),
        ({"re_mode": "blur"}, "re_mode must be one of const, rand, pixel"),
        ({"interpolation": "cubicle"}, "unknown interpolation 'cubicle'"),
        ({"hflip": 1.5}, "hflip is a probability"),
        ({"scale": [1.0, 0.5]}, "scale must be two numbers"),
        ({"crop_pct": 0}, "crop_pct must be in"),
        ({"color_jitter": [0.1, 0.2]}, "color_jitter is one number or 3"),
    ],
)
def test_bad_augmentation_options_are_one_clear_error(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        ImageFolderDataModule(str(_folder(tmp_path / "train")), **options)


@pytest.mark.parametrize("name", ["data_image_folder.yaml", "data_shards.yaml"])
def test_example_data_configs_parse(name):
    """The example ``data:`` sections are valid for their class (paths are the user's)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / name).read_text()
    parser = ArgumentParser()
    parser.add_subclass_arguments(VisionDataModule, "data")
    cfg = parser.parse_object(yaml.safe_load(text))
    assert cfg.data.init_args.auto_augment == "rand-m9-mstd0.5-inc1"
    assert timm_transform(True, 32, auto_augment=cfg.data.init_args.auto_augment)
