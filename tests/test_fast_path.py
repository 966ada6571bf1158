import torch
from conftest import CNN
from test_nonfinite import _fit

from visdistill import DistillationModule, ModelConfig


def test_compile_and_bf16_teachers_keep_checkpoint_keys(tmp_path):
    from visdistill import KD

    module = DistillationModule(
        student=ModelConfig(**CNN),
        teachers=[ModelConfig(**CNN)],
        terms=[KD()],
        teacher_precision="bf16",
        compile={"backend": "eager"},
    )
    keys = set(module.state_dict())
    _fit(module, tmp_path, batches=2)
    assert set(module.state_dict()) == keys  # no `_orig_mod.` prefixes
    batch = {"image": torch.rand(4, 3, 32, 32), "target": torch.arange(4)}
    with module._teacher_autocast(batch["image"]):
        assert module.teachers(batch["image"])[0].logits.dtype == torch.bfloat16
    total, parts, _ = module.compute_losses(batch)
    assert torch.isfinite(total) and parts["kd"].dtype == torch.float32
