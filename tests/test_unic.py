"""UNIC term: loss formula, teacher-weight hand-off, CNN student with ViT/ConvNeXt teachers of
other grids, running statistics under DDP at the term level, a real fit. (More in
test_multi_teacher.py: the dropping rate, the EMA schedule, the standardiser under DDP.)"""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import CNN, VIT, fit_two_steps

from visdistill import KD, UNIC, ConfigError, DistillationModule, ModelConfig
from visdistill.losses import feature_match_loss, teacher_drop_coefficients
from visdistill.models import ModelOutput
from visdistill.terms.unic import _resample, ema_weight


def test_feature_match_loss_by_hand():
    pred = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [3.0, 4.5]])
    cos = torch.tensor([0.0, (9 + 18) / (5 * (9 + 4.5**2) ** 0.5)])
    # SmoothL1 (beta 1): |d| < 1 -> 0.5 d^2, else |d| - 0.5; averaged over channels.
    sl1 = torch.tensor([(0.5 + 0.5) / 2, (0 + 0.5 * 0.25) / 2])
    assert torch.allclose(feature_match_loss(pred, target), 0.5 * (1 - cos) + 0.5 * sl1)
    # Token maps: per token, then averaged over tokens.
    tokens = feature_match_loss(torch.stack([pred, pred], 1), torch.stack([target, pred], 1))
    assert torch.allclose(tokens, 0.5 * (0.5 * (1 - cos) + 0.5 * sl1))


def test_dropping_with_p_near_one_keeps_only_the_worst_teacher():
    losses = torch.tensor([[0.1, 0.9, 0.3], [2.0, 1.0, 0.5]])
    coeff = teacher_drop_coefficients(losses, p=0.999999, normalize="per_image")
    assert torch.equal(coeff > 0, torch.tensor([[False, True, False], [True, False, False]]))
    assert torch.allclose(coeff.sum(-1), torch.full((2,), 0.5))


def test_resample_pools_down_and_interpolates_up():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(_resample(x, (2, 2)), F.avg_pool2d(x, 2))
    up = _resample(torch.ones(1, 3, 1, 1), (4, 4))
    assert up.shape == (1, 3, 4, 4) and torch.equal(up, torch.ones(1, 3, 4, 4))


def _modules(student=CNN, drop_prob=0.5, extra=()):
    teachers = [
        ModelConfig(**VIT),  # 4x4 grid of 192-d tokens
        ModelConfig(name="convnext_atto", num_classes=10),  # 1x1 map of 320 channels at 32 px
    ]
    return DistillationModule(ModelConfig(**student), teachers, [UNIC(drop_prob=drop_prob), *extra])


def test_cnn_student_learns_vit_and_convnext_features_of_other_widths_and_grids():
    module = _modules()
    term = module.terms[0]
    # resnet10t at 32 px: the last three stages are 128 ch at 4x4, 256 at 2x2, 512 at 1x1.
    assert term.student_stages == (2, 3, 4)
    assert [mlp[-1].out_features for mlp in term.patch_ladders[0]] == [192] * 3
    assert [mlp[0].in_features for mlp in term.cls_ladders[1]] == [128, 256, 512]
    batch = {"image": torch.rand(6, 3, 32, 32), "target": torch.arange(6) % 10}
    loss, parts, out = module.compute_losses(batch)
    loss.backward()
    assert torch.isfinite(parts["unic"]) and parts["unic"] > 0
    # Every ladder rung is used, so every projector gets a gradient.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert all(p.grad is None for p in module.teachers.parameters())


@pytest.mark.parametrize("student_cls", ["auto", "pool"])
def test_vit_student_feeds_its_class_tokens_to_the_cls_ladder(student_cls):
    """The paper's ViT students predict the teachers' cls features from their own class
    token at each block; ``pool`` (and every CNN) uses the average-pooled stage map."""
    module = DistillationModule(
        ModelConfig(**VIT), [ModelConfig(**CNN)], [UNIC(drop_prob=0.0, student_cls=student_cls)]
    )
    term = module.terms[0]
    assert module.needs_prefix_tokens == term.needs_prefix_tokens == (student_cls == "auto")
    seen = []
    hook = term.cls_ladders[0][-1][0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    images = torch.rand(4, 3, 32, 32)
    module.compute_losses({"image": images, "target": torch.arange(4)})
    hook.remove()
    stage = term.student_stages[-1]
    out = module.student(images, stages=(stage,), prefix_tokens=True)
    expected = out.prefix_tokens[stage][:, 0] if student_cls == "auto" else None
    if expected is None:
        expected = out.stages[stage].mean(dim=(2, 3))
    assert torch.allclose(seen[0], expected, atol=1e-6)
    cnn = DistillationModule(ModelConfig(**CNN), [ModelConfig(**CNN)], [UNIC()])
    assert not cnn.needs_prefix_tokens


def test_teacher_weights_are_the_normalised_keep_mask_and_loss_uses_the_same_draw():
    module = _modules(drop_prob=0.5)
    term = module.terms[0]
    batch = torch.rand(8, 3, 32, 32)
    student = module.student(batch, stages=module.student_stages, pooled=True)
    teachers = module.teachers(batch, stages=module.teacher_stages, pooled=True)
    stats = {k: v.clone() for k, v in term.state_dict().items() if "stats" in k}
    rng = torch.get_rng_state()
    out = term(student, teachers, None)  # one call: the loss and the weights of one draw
    weights = out.teacher_weights
    # The same draw by hand, from the same statistics and random state.
    term.load_state_dict(stats, strict=False)
    torch.set_rng_state(rng)
    losses = term.per_teacher_losses(student, teachers)
    coeff = teacher_drop_coefficients(losses, 0.5, "global")
    keep = coeff > 0
    assert torch.equal(weights > 0, keep)
    assert torch.allclose(weights.sum(-1), torch.ones(8))
    assert torch.allclose(coeff.sum(), torch.tensor(1.0))  # global normalisation
    assert keep[torch.arange(8), losses.argmax(-1)].all()
    assert torch.allclose(out.losses["unic"], (coeff * losses).sum())


def test_without_dropping_every_teacher_counts_equally():
    module = _modules(drop_prob=0.0)
    term = module.terms[0]
    batch = torch.rand(4, 3, 32, 32)
    student = module.student(batch, stages=module.student_stages, pooled=True)
    teachers = module.teachers(batch, stages=module.teacher_stages, pooled=True)
    stats = {k: v.clone() for k, v in term.state_dict().items() if "stats" in k}
    out = term(student, teachers, None)
    assert torch.allclose(out.teacher_weights, torch.full((4, 2), 0.5))
    term.load_state_dict(stats, strict=False)
    losses = term.per_teacher_losses(student, teachers)
    assert torch.allclose(out.losses["unic"], losses.mean())


def test_statistics_freeze_in_eval_mode():
    module = _modules()
    term = module.terms[0].eval()
    batch = torch.rand(4, 3, 32, 32)
    student = module.student(batch, stages=module.student_stages, pooled=True)
    teachers = module.teachers(batch, stages=module.teacher_stages, pooled=True)
    buffers = {k: v.clone() for k, v in term.state_dict().items() if "stats" in k}
    term(student, teachers, None)
    assert all(torch.equal(term.state_dict()[k], v) for k, v in buffers.items())


def test_config_errors():
    with pytest.raises(ConfigError, match=r"drop_prob must be in \[0, 1\)"):
        UNIC(drop_prob=1.0)
    with pytest.raises(ConfigError, match="normalize must be 'global' or 'per_image'"):
        UNIC(normalize="batch")
    with pytest.raises(ConfigError, match="student_cls must be 'auto' or 'pool'"):
        UNIC(student_cls="token")
    with pytest.raises(ConfigError, match="has no stage"):
        DistillationModule(ModelConfig(**CNN), [ModelConfig(**CNN)], [UNIC(student_stages=[7])])


# --------------------------------------------------------------------- DDP, whole term
def _stub(stage_chs, d):
    info = [dict(num_chs=c, reduction=2**i, module=f"s{i}") for i, c in enumerate(stage_chs)]
    return SimpleNamespace(feature_info=info, num_features=d, check_stages=lambda s: None)


def _stub_term():
    torch.manual_seed(0)
    term = UNIC(student_stages=[0, 1], drop_prob=0.5)
    term.setup(_stub([4, 6], 5), [_stub([3, 7], 7), _stub([3], 3)])
    return term


def _outputs(g, n):
    student = ModelOutput(
        torch.randn(n, 10, generator=g),
        stages={0: torch.randn(n, 4, 4, 4, generator=g), 1: torch.randn(n, 6, 2, 2, generator=g)},
    )
    teachers = [
        ModelOutput(
            torch.randn(n, 10, generator=g),
            pooled=torch.randn(n, 7, generator=g) * 2 + 1,
            stages={-1: torch.randn(n, 7, 2, 2, generator=g) - 3},
        ),
        ModelOutput(
            torch.randn(n, 10, generator=g),
            pooled=torch.randn(n, 3, generator=g) * 5,
            stages={-1: torch.randn(n, 3, 1, 1, generator=g)},
        ),
    ]
    return student, teachers


def _shard(out, rank, world):
    take = lambda t: t[rank::world]  # noqa: E731
    return ModelOutput(
        take(out.logits),
        pooled=None if out.pooled is None else take(out.pooled),
        stages={k: take(v) for k, v in out.stages.items()},
    )


def _two_steps(term, rank=0, world=1):
    for step, progress in enumerate((0.0, 0.4)):
        student, teachers = _outputs(torch.Generator().manual_seed(step), 12)
        term.progress = progress
        term(_shard(student, rank, world), [_shard(t, rank, world) for t in teachers], None)
    return {k: v.clone() for k, v in term.state_dict().items() if "stats" in k}


def _ddp_worker(rank, world, port, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out[rank] = _two_steps(_stub_term(), rank, world)
    dist.destroy_process_group()


def test_unic_term_statistics_are_identical_across_ranks_and_equal_the_union():
    single = _two_steps(_stub_term())
    assert ema_weight(0.4) < 1  # the second step mixes old and new statistics
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    assert len(single) == 8  # mean and std of cls and patch, for both teachers
    for key, value in single.items():
        assert torch.equal(out[0][key], out[1][key]), key  # bit-identical on both ranks
        assert torch.allclose(out[0][key], value, atol=1e-5), key


# --------------------------------------------------------------------- a real fit
def test_unic_with_kd_fits_with_a_lightning_trainer(tmp_path):
    module = _modules(extra=(KD(),))
    term = module.terms[0]
    stats_before = term.cls_stats[1].mean.clone()
    trainer, steps = fit_two_steps(module, tmp_path)
    assert len(steps) == 2 and all(None not in norms.values() for norms in steps)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert {"train/unic", "train/kd"} <= set(trainer.callback_metrics)
    assert not torch.equal(term.cls_stats[1].mean, stats_before)
