"""Multi-resolution training (``student_sizes``): the student trains at a size drawn per step,
the teachers keep their own sizes, the spatial terms line their maps up, and what cannot
change size is refused."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from visdistill import (
    OFA,
    TRG,
    UNIC,
    AdaptorHeads,
    ConfigError,
    DigitsDataModule,
    DistillationModule,
    DisWOT,
    ModelConfig,
)
from visdistill.multi_resolution import StudentSizes, draw_student_size

SIZES = [32, 48]
DATA_SIZE = 40  # the canonical batch: neither a student size nor a teacher's
CNN_STUDENT = dict(name="resnet10t", num_classes=0)
VIT_STUDENT = dict(
    name="vit_tiny_patch16_224",
    num_classes=0,
    input_size=64,  # evaluated at 64 px
    model_kwargs=dict(dynamic_img_size=True, depth=2),
)
# Each teacher at its own native size: a CNN resized to 56 px, a patch-8 ViT built for 64 px.
TEACHERS = [
    dict(name="resnet10t", num_classes=0, input_size=56, alias="cnn"),
    dict(
        name="vit_tiny_patch16_224",
        num_classes=0,
        model_kwargs=dict(img_size=64, patch_size=8, depth=2),
        alias="vit",
    ),
]


def _input_sides(model: nn.Module, sides: list[int]) -> None:
    """Record the side of every input to ``model``'s first convolution (its image input)."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_pre_hook(lambda mod, args: sides.append(args[0].shape[-1]))


def test_draws_are_a_function_of_seed_and_step_only():
    state = torch.get_rng_state()
    draws = [draw_student_size([160, 192, 224], 3, step) for step in range(200)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert draws == [draw_student_size([160, 192, 224], 3, step) for step in range(200)]
    assert set(draws) == {160, 192, 224}
    counts = [draws.count(s) for s in (160, 192, 224)]
    assert min(counts) > 40  # uniform: about 67 each
    assert draws != [draw_student_size([160, 192, 224], 4, step) for step in range(200)]
    assert draws[50:] == [draw_student_size([160, 192, 224], 3, step) for step in range(50, 200)]


def test_student_input_at_its_data_size_is_its_usual_preprocessing():
    module = DistillationModule(
        student=ModelConfig(**CNN_STUDENT),
        teachers=[ModelConfig(**TEACHERS[0])],
        terms=[AdaptorHeads(normalize="none")],
        ce_weight=0.0,
        student_sizes=[DATA_SIZE],
    )
    images = torch.rand(2, 3, DATA_SIZE, DATA_SIZE)
    ours = module.student_sizes.preprocess(module.student, images, step=5)
    torch.testing.assert_close(ours, module.student.preprocess(images))
    small = module.student_sizes.preprocess(module.student, torch.rand(2, 3, 64, 64), step=0)
    assert small.shape == (2, 3, DATA_SIZE, DATA_SIZE)


@pytest.mark.parametrize("student", [CNN_STUDENT, VIT_STUDENT], ids=["cnn", "vit"])
def test_label_free_adaptor_fit_student_at_drawn_sizes_teachers_at_their_own(student, tmp_path):
    torch.manual_seed(0)
    # A seed whose first 3 steps use both sizes.
    seed = next(
        s for s in range(100) if len({draw_student_size(SIZES, s, i) for i in range(3)}) == 2
    )
    module = DistillationModule(
        student=ModelConfig(**student),
        teachers=[ModelConfig(**t) for t in TEACHERS],
        terms=[AdaptorHeads(teacher_stage=[-1, -1], normalize="standardize", fit_samples=16)],
        ce_weight=0.0,
        student_sizes=SIZES,
        student_sizes_seed=seed,
    )
    student_sides, teacher_sides = [], {0: [], 1: []}
    _input_sides(module.student.model, student_sides)
    for i, teacher in enumerate(module.teachers):
        _input_sides(teacher.model, teacher_sides[i])
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert batch["image"].shape[-1] == DATA_SIZE
            steps.append((pl_module.global_step, len(student_sides)))

        def on_validation_start(self, trainer, pl_module):
            steps.append(("val", len(student_sides)))

    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    data = DigitsDataModule(
        image_size=DATA_SIZE, batch_size=8, train_subset=24, labels=False, augment=False
    )
    trainer = L.Trainer(
        max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Steps()], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)

    assert trainer.global_step == 3
    expected = [draw_student_size(SIZES, seed, step) for step in range(3)]
    assert set(expected) == set(SIZES)  # both sizes occur in these 3 steps
    train_marks = [(s, n) for s, n in steps if s != "val"]
    trained = [student_sides[n] for _, n in train_marks]
    assert [s for s, _ in train_marks] == [0, 1, 2]
    assert trained == expected
    val_marks = [n for s, n in steps if s == "val"]
    configured = student.get("input_size", DATA_SIZE)  # a CNN keeps the data's size
    assert val_marks and student_sides[val_marks[0]] == configured  # evaluation
    # The normaliser pass, every training step and validation: always the teachers' own sides.
    assert set(teacher_sides[0]) == {56} and set(teacher_sides[1]) == {64}
    assert len(teacher_sides[0]) >= 4
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    after = module.student.state_dict()
    assert any(
        not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
    )


@pytest.mark.parametrize(
    "term",
    [lambda: UNIC(drop_prob=0.0), lambda: TRG(grid=4), lambda: DisWOT()],
    ids=["unic", "trg", "diswot"],
)
def test_spatial_terms_take_any_student_grid(term):
    """UNIC resamples the student's map to the teacher's grid, TRG both maps to its token
    grid, DisWOT compares grid-free (C, C) and (B, B) matrices: the loss is finite at every
    student size, against a teacher that keeps its own."""
    torch.manual_seed(0)
    for side in SIZES:
        module = DistillationModule(
            student=ModelConfig(**CNN_STUDENT),
            teachers=[ModelConfig(**TEACHERS[1])],
            terms=[term()],
            ce_weight=0.0,
            student_sizes=[side],
        ).train()
        batch = {"image": torch.rand(4, 3, DATA_SIZE, DATA_SIZE), "target": torch.full((4,), -1)}
        batch["index"] = torch.arange(4)
        total, parts, out = module.compute_losses(batch)
        assert math.isfinite(float(total.detach())) and float(total.detach()) > 0
        stage = module.student_stages[-1]
        reduction = module.student.feature_info[stage]["reduction"]
        assert out.stages[stage].shape[-1] == math.ceil(side / reduction)


def test_refusals_name_the_fix():
    def build(student, terms=None, sizes=SIZES, teachers=None):
        return DistillationModule(
            student=ModelConfig(**student),
            teachers=[ModelConfig(**t) for t in teachers or TEACHERS[:1]],
            terms=terms or [AdaptorHeads(normalize="none")],
            ce_weight=0.0,
            student_sizes=sizes,
        )

    fixed_vit = dict(name="vit_tiny_patch16_224", num_classes=0, model_kwargs=dict(depth=2))
    with pytest.raises(ConfigError, match=r"fixed input size 224x224.*dynamic_img_size: true"):
        build(fixed_vit)
    mixer = dict(name="mixer_s16_224", num_classes=0, model_kwargs=dict(img_size=32))
    with pytest.raises(ConfigError, match=r"fixed input size 32x32.*a CNN"):
        build(mixer)
    with pytest.raises(
        ConfigError, match=r"40 is not a multiple of the student's patch size 16x16"
    ):
        build(VIT_STUDENT, sizes=[32, 40])
    with pytest.raises(ConfigError, match=r"input_size 56x56 is not a multiple"):
        build({**VIT_STUDENT, "input_size": 56})
    with pytest.raises(ConfigError, match=r"give it the input_size .* e\.g\. input_size: 48"):
        build({k: v for k, v in VIT_STUDENT.items() if k != "input_size"})
    padded = {
        **VIT_STUDENT,
        "model_kwargs": {**VIT_STUDENT["model_kwargs"], "dynamic_img_pad": True},
    }
    assert build(padded, sizes=[32, 40]).student_sizes.sizes == [32, 40]
    for bad in ([], [32, "48"], [0, 32], [True]):
        with pytest.raises(ConfigError, match="student_sizes"):
            build(CNN_STUDENT, sizes=bad)
    # OFA's token exits are built for the ViT student's configured grid; its CNN exits pool.
    vit = {**VIT_STUDENT, "num_classes": 10}
    teacher = [dict(name="resnet10t", num_classes=10)]
    with pytest.raises(ConfigError, match=r"OFA built layers .* branch: cnn"):
        build(vit, terms=[OFA()], teachers=teacher)
    assert build(vit, terms=[OFA(branch="cnn")], teachers=teacher).student_sizes is not None


def test_sizes_object_refuses_without_a_module():
    module = DistillationModule(student=ModelConfig("resnet10t", num_classes=10))
    assert module.student_sizes is None
    with pytest.raises(ConfigError, match="non-empty list"):
        StudentSizes([], 0, module.student, [])


def test_checkpoints_record_the_training_options(tmp_path):
    """student_sizes and the other plain training options are hyper-parameters: a checkpoint
    says how it was trained and load_from_checkpoint rebuilds them."""
    module = DistillationModule(
        student=ModelConfig(**CNN_STUDENT),
        teachers=[ModelConfig(**TEACHERS[0])],
        terms=[AdaptorHeads(student_stage=-2, teacher_stage=-2, normalize="none")],
        ce_weight=0.0,
        student_sizes=SIZES,
        student_sizes_seed=3,
        channels_last=False,
        compile={"mode": "reduce-overhead"},
        nonfinite="raise",
        teacher_cache=str(tmp_path / "cache"),
    )
    expected = {
        "student_sizes": SIZES,
        "student_sizes_seed": 3,
        "channels_last": False,
        "compile": {"mode": "reduce-overhead"},
        "nonfinite": "raise",
    }
    assert {k: module.hparams[k] for k in expected} == expected
    assert "teacher_cache" not in module.hparams  # a path on the training machine
    path = tmp_path / "m.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    loaded = DistillationModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.student_sizes is not None and loaded.student_sizes.sizes == SIZES
    assert (loaded.channels_last, loaded.compile_options) == (False, {"mode": "reduce-overhead"})
    assert loaded.teacher_cache_dir is None
