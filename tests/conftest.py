import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n auto` runs one worker per core; torch's default (a thread per core in every
    # worker) would oversubscribe them.
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _workers))

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


def fit_two_steps(module, tmp_path):
    """Two training steps on digits (``fast_dev_run=2``) -> ``(trainer, norms)``: per step,
    each term parameter's gradient norm after backward (``None``: no gradient). Checks on
    every step that the frozen teachers got no gradient and that their weights never move."""
    import lightning as L

    from visdistill import DigitsDataModule

    teachers_before = {k: v.clone() for k, v in module.teachers.state_dict().items()}
    norms = []

    class Probe(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            norms.append(
                {n: (p.grad.norm().item() if p.grad is not None else None)
                 for n, p in pl_module.terms.named_parameters()}
            )  # fmt: skip
            assert all(p.grad is None for p in pl_module.teachers.parameters())

    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", default_root_dir=tmp_path, callbacks=[Probe()]
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))
    after = module.teachers.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in teachers_before.items())
    return trainer, norms
