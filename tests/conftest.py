import pytest
import torch

# Tiny but real timm configurations, one per family, all at 32 px.
CNN = dict(name="resnet10t", num_classes=10)
VIT = dict(
    name="vit_tiny_patch16_224",
    num_classes=10,
    model_kwargs=dict(img_size=32, patch_size=8, depth=2),
)
MLP = dict(name="mixer_s16_224", num_classes=10, model_kwargs=dict(img_size=32))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def batch():
    return torch.rand(2, 3, 32, 32)
