"""DisWOT metrics (hand-computed cases and properties), the scorer, and the DisWOT term."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visdistill import ConfigError
from visdistill.losses.diswot import (
    batch_relation,
    ickd_distance,
    inter_channel_correlation,
    pool_channels,
    relation_similarity,
    semantic_similarity,
    similarity_preserving_distance,
)
from visdistill.models import Backbone
from visdistill.search import DisWOTScorer, diswot_score, gaussian_init_
from visdistill.teachers import Teacher
from visdistill.terms.diswot import DisWOT

# A tiny timm ResNet (basic blocks, 8-16 channels): milliseconds per forward at 32 px.
TINY = dict(
    name="resnet10t", num_classes=10, model_kwargs=dict(channels=[8, 8, 16, 16], stem_width=8)
)
TINY_WIDE = dict(
    name="resnet10t", num_classes=10, model_kwargs=dict(channels=[8, 8, 16, 32], stem_width=8)
)


# ------------------------------------------------------------------ hand-computed metrics
def test_semantic_similarity_hand_computed():
    """g_s = [1, 2], g_t = [1, -1] (one class). Row-normalised g g^T: student rows u, u with
    u = [1, 2]/sqrt5; teacher rows v, -v with v = [1, -1]/sqrt2. Distance
    (|u - v|^2 + |u + v|^2) / (K C) = (2|u|^2 + 2|v|^2) / 2 = 2, so M_s = -2."""
    g_s = torch.tensor([[1.0, 2.0]])
    g_t = torch.tensor([[1.0, -1.0]])
    assert semantic_similarity(g_t, g_s).item() == pytest.approx(-2.0, abs=1e-6)
    # Row by row, as the matrices are written out:
    s = inter_channel_correlation(g_s.unsqueeze(-1))[0]
    u = torch.tensor([1.0, 2.0]) / math.sqrt(5)
    torch.testing.assert_close(s, torch.stack([u, u]))


def test_semantic_similarity_two_classes_averages_over_k_and_c():
    # Class 0 identical (distance 0); class 1 is the case above (sum of squares 4).
    g_t = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    g_s = torch.tensor([[6.0, 2.0], [1.0, 2.0]])
    assert semantic_similarity(g_t, g_s).item() == pytest.approx(-4.0 / (2 * 2), abs=1e-6)


def test_semantic_similarity_is_zero_for_scaled_or_negated_gradients_and_negative_otherwise():
    g = torch.randn(10, 16)
    assert semantic_similarity(g, 3.0 * g).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_similarity(g, -g).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_similarity(g, torch.randn(10, 16)).item() < 0


def test_semantic_similarity_matches_the_sign_identity_in_numpy():
    """Row i of the row-normalised g g^T is sign(g_i) g / |g| (spec §5.2 algebra note)."""
    rng = np.random.default_rng(0)
    g_t, g_s = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))

    def rows(g):
        return np.sign(g)[:, :, None] * (g / np.linalg.norm(g, axis=1, keepdims=True))[:, None, :]

    expected = -((rows(g_s) - rows(g_t)) ** 2).sum() / (5 * 7)
    got = semantic_similarity(torch.tensor(g_t), torch.tensor(g_s)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_relation_similarity_hand_computed():
    """a = I (Gram I), b = two equal rows (Gram all ones -> rows [1, 1]/sqrt2):
    |I - ones/sqrt2|^2 = 2 (1 - 1/sqrt2)^2 + 2 (1/2) = 4 - 2 sqrt2, over B^2 = 4."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = (4 - 2 * math.sqrt(2)) / 4
    assert similarity_preserving_distance(a, b).item() == pytest.approx(expected, abs=1e-6)
    assert relation_similarity(a, b).item() == pytest.approx(-expected, abs=1e-6)


def test_relation_similarity_is_width_free_and_zero_for_equal_relations():
    f = torch.randn(6, 4, 3, 3)
    assert relation_similarity(f, f).item() == pytest.approx(0.0, abs=1e-6)
    # Another width, same relations: f scaled and with duplicated channels.
    g = torch.cat([2 * f, 2 * f], dim=1)
    assert relation_similarity(f, g).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_similarity(f, torch.randn(6, 9)).item() < 0
    torch.testing.assert_close(batch_relation(f).norm(dim=1), torch.ones(6))


def test_ickd_distance_per_item_with_different_spatial_sizes():
    a = torch.randn(3, 4, 5, 5)
    b = torch.randn(3, 4, 2, 2)
    manual = sum(
        (
            F.normalize(x.reshape(4, -1) @ x.reshape(4, -1).T, dim=1)
            - F.normalize(y.reshape(4, -1) @ y.reshape(4, -1).T, dim=1)
        )
        .pow(2)
        .sum()
        for x, y in zip(a, b, strict=True)
    ) / (3 * 4)
    assert ickd_distance(a, b).item() == pytest.approx(manual.item(), rel=1e-5)


def test_channel_mismatch_raises_unless_pooling_is_asked_for():
    g_t, g_s = torch.randn(10, 8), torch.randn(10, 16)
    with pytest.raises(ConfigError, match=r"teacher \(K, C\) = \(10, 8\), student \(10, 16\)"):
        semantic_similarity(g_t, g_s)
    pooled = semantic_similarity(g_t, g_s, channel_adapter="pool")
    expected = semantic_similarity(g_t, g_s.reshape(10, 8, 2).mean(-1))
    assert pooled.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="different class counts"):
        semantic_similarity(torch.randn(10, 8), torch.randn(100, 8), channel_adapter="pool")
    with pytest.raises(ConfigError, match="equal N and C"):
        ickd_distance(torch.randn(10, 8, 1), torch.randn(10, 6, 1))


def test_pool_channels_hand_computed():
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0]])
    torch.testing.assert_close(pool_channels(x, 2), torch.tensor([[2.0, 6.0]]))
    assert pool_channels(x, 4) is x


# ----------------------------------------------------------------------------- scorer
@pytest.fixture
def digits_batch():
    torch.manual_seed(0)
    return torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))


def test_classifier_gradient_is_the_closed_form(digits_batch):
    """dCE/dW = (softmax(z) - onehot)^T f / B with f the pooled features."""
    images, targets = digits_batch
    model = Backbone(**TINY)
    scorer = DisWOTScorer(Backbone(**TINY), images, targets, use=("semantic",), init="gaussian")
    gaussian_init_(model)
    grad, _ = scorer._probe(model)
    torch.nn.Module.train(model, True)
    with torch.no_grad():
        out = model(images, pooled=True)
    manual = (out.logits.softmax(-1) - F.one_hot(targets, 10).float()).T @ out.pooled / len(images)
    torch.testing.assert_close(grad, manual, rtol=1e-4, atol=1e-5)


def test_diswot_score_is_deterministic_and_leaves_the_models_untouched(digits_batch):
    images, targets = digits_batch
    teacher, student = Backbone(**TINY), Backbone(**TINY_WIDE)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    a = diswot_score(teacher, student, images, targets, seed=3)
    b = diswot_score(teacher, student, images, targets, seed=3)
    c = diswot_score(teacher, student, images, targets, seed=4)
    assert a == b and a != c
    assert a.total == pytest.approx(a.semantic + a.relation)
    assert a.semantic < 0 and a.relation < 0
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # A student of the teacher's own architecture is not the random teacher's clone.
    assert diswot_score(teacher, Backbone(**TINY), images, targets).total < 0
    # timm's own init, and one component only.
    d = diswot_score(teacher, student, images, targets, init="default", use=("relation",))
    assert d.semantic is None and d.total == d.relation


def test_trained_teacher_is_used_as_is_and_frozen_teachers_work(digits_batch):
    images, targets = digits_batch
    teacher = Teacher(**TINY)  # frozen: requires_grad False, eval-locked
    student = Backbone(**TINY_WIDE)
    random_teacher = diswot_score(teacher, student, images, targets)
    trained = diswot_score(teacher, student, images, targets, reinit_teacher=False)
    assert random_teacher != trained
    assert not any(p.requires_grad for p in teacher.parameters())


def test_scorer_errors_are_clear(digits_batch):
    images, targets = digits_batch
    teacher = Backbone(**TINY)
    with pytest.raises(ConfigError, match="classifier gradients have different channel counts"):
        diswot_score(teacher, Backbone(**TINY_WIDE), images, targets, channel_adapter="none")
    with pytest.raises(ConfigError, match="predicts 5 classes"):
        diswot_score(teacher, Backbone(**{**TINY, "num_classes": 5}), images, targets)
    with pytest.raises(ConfigError, match="use must be"):
        DisWOTScorer(teacher, images, targets, use=("semantics",))
    with pytest.raises(ConfigError, match="labels span"):
        DisWOTScorer(teacher, images, targets + 10)


# ------------------------------------------------------------------------ DisWOT term
def test_diswot_term_matches_the_distances_and_trains_only_the_student():
    torch.manual_seed(0)
    student, teacher = Backbone(**TINY_WIDE), Teacher(**TINY)
    term = DisWOT()
    term.setup(student, [teacher])
    assert term.student_stages == (-1,) and term.teacher_stages == [(-1,)]
    assert isinstance(term.projectors[0], torch.nn.Sequential)  # 32 -> 16 channels
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    s_out = student(x, stages=(-1,))
    t_out = teacher(x, stages=(-1,))
    losses = term(s_out, [t_out], y)
    feat_s, feat_t = s_out.stages[-1], t_out.stages[-1]
    expected_rel = similarity_preserving_distance(feat_s, feat_t)
    expected_sem = ickd_distance(term.projectors[0](feat_s), feat_t)
    torch.testing.assert_close(losses["relation"], expected_rel)
    torch.testing.assert_close(losses["semantic"], expected_sem)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert term.projectors[0][0].weight.grad is not None


def test_diswot_term_is_zero_when_the_student_reproduces_the_teacher():
    torch.manual_seed(0)
    student, teacher = Backbone(**TINY), Teacher(**TINY)
    term = DisWOT(relation_weight=2.0)
    term.setup(student, [teacher])
    assert isinstance(term.projectors[0], torch.nn.Identity)
    feats = torch.randn(4, 16, 1, 1)
    from visdistill.models import ModelOutput

    out = ModelOutput(logits=torch.zeros(4, 10), stages={-1: feats})
    losses = term(out, [out], torch.zeros(4, dtype=torch.long))
    assert losses["semantic"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["relation"].item() == pytest.approx(0.0, abs=1e-6)


def test_diswot_term_config_errors():
    with pytest.raises(ConfigError, match="not both 0"):
        DisWOT(semantic_weight=0, relation_weight=0)
    term = DisWOT(teacher_stage=[-1, -1])
    with pytest.raises(ConfigError, match="2 stages for 1 teachers"):
        term.setup(Backbone(**TINY), [Teacher(**TINY)])
    with pytest.raises(ConfigError, match="no stage"):
        DisWOT(student_stage=9).setup(Backbone(**TINY), [Teacher(**TINY)])


def test_diswot_term_trains_in_the_module(tmp_path):
    import lightning as L

    from visdistill import DigitsDataModule, DistillationModule, ModelConfig

    module = DistillationModule(
        student=ModelConfig(**TINY_WIDE),
        teachers=[ModelConfig(**TINY)],
        terms=[DisWOT(weight=1.0)],
    )
    assert module.student_stages == (-1,) and module.teacher_stages == [(-1,)]
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    assert logged["train/diswot/semantic"] > 0 and logged["train/diswot/relation"] > 0
