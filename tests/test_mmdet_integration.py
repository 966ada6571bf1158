"""visdistill.integrations.mmdet with mmdet's own Runner on the Fashion-MNIST mosaics (CPU, short).

Skipped when the ``mmdet`` extra is not installed (``bash scripts/install_mmdet.sh``).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from visdistill.errors import CheckpointError, ConfigError  # noqa: E402
from visdistill.integrations.mmdet import (  # noqa: E402
    DistillingDetector,
    convert_checkpoint,
    read_state_dict,
)
from visdistill.integrations.mmdet.__main__ import main as mmdet_cli  # noqa: E402
from visdistill.integrations.mosaic_coco import make_mosaic_coco  # noqa: E402

register_all_modules()  # default scope "mmdet" for models built outside a Runner
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mmdet"
TEACHER_EPOCHS, STUDENT_EPOCHS = 4, 3  # 16 images, batch 4: 4 iterations per epoch


def epoch_medians(values: list[float], per_epoch: int = 4) -> list[float]:
    """Median loss of each epoch (one hard batch does not decide the trend)."""
    return [statistics.median(values[i : i + per_epoch]) for i in range(0, len(values), per_epoch)]


class LossRecorder(Hook):
    """Every training iteration's logged losses."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = defaultdict(list)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        for key, value in (outputs or {}).items():
            self.history[key].append(float(value))


def short_config(name: str, data_root: Path, work_dir: Path, epochs: int) -> Config:
    """A shipped config on the test's mosaic folder, with a short schedule and no visualisation."""
    cfg = Config.fromfile(str(CONFIGS / name))
    root = str(data_root) + "/"
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
        loader.batch_size = 4
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = root + "annotations/val.json"
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = 1000  # validated explicitly by the tests
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=4)]
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=epochs)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=50)
    cfg.default_hooks.pop("visualization")
    cfg.work_dir = str(work_dir)
    return cfg


def small_teacher(cfg: Config) -> None:
    """ResNet-34 instead of the shipped ResNet-50 teacher: larger than the ResNet-18 student, but
    fast enough for a test (the shipped configs are what docs/mmdet.md measures)."""
    cfg.model.backbone.depth = 34
    cfg.model.neck.in_channels = [128, 256, 512]


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mosaic")
    make_mosaic_coco(root, {"train": 16, "val": 8}, image_size=128, seed=0)
    return root


@pytest.fixture(scope="module")
def teacher_run(mosaic, tmp_path_factory) -> dict:
    """A teacher trained by mmengine's Runner: its Runner checkpoint and a converted state dict."""
    work = tmp_path_factory.mktemp("teacher")
    cfg = short_config("retinanet_r50_mosaic_teacher.py", mosaic, work, TEACHER_EPOCHS)
    small_teacher(cfg)
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    runner_ckpt = work / f"epoch_{TEACHER_EPOCHS}.pth"
    safe = convert_checkpoint(runner_ckpt, work / "teacher.safetensors", trusted=True)
    return {"cfg": cfg, "runner_ckpt": runner_ckpt, "weights": safe, "losses": recorder.history}


def test_teacher_trains(teacher_run):
    loss = teacher_run["losses"]["loss"]
    assert len(loss) == TEACHER_EPOCHS * 4
    assert all(math.isfinite(v) for v in loss)
    medians = epoch_medians(loss)
    assert medians[-1] < medians[0], medians


def test_runner_checkpoint_refused_weights_only_with_the_way_out(teacher_run):
    ckpt = teacher_run["runner_ckpt"]
    with pytest.raises(CheckpointError, match="Runner checkpoint") as info:
        read_state_dict(ckpt)
    assert "teacher_trusted=True" in str(info.value) and "convert" in str(info.value)
    # the converted file loads weights-only and holds the same tensors
    plain = read_state_dict(teacher_run["weights"])
    trusted = read_state_dict(ckpt, trusted=True)
    assert plain.keys() == trusted.keys()
    assert all(torch.equal(plain[k], trusted[k]) for k in plain)
    # a torch-saved plain state dict ({"state_dict": ...}, the model zoo's layout) also loads weights-only
    pth = convert_checkpoint(ckpt, ckpt.parent / "teacher_plain.pth", trusted=True)
    assert read_state_dict(pth).keys() == plain.keys()


def test_cli_convert_refuses_untrusted_runner_checkpoint(teacher_run, tmp_path, capsys):
    assert (
        mmdet_cli(["convert", str(teacher_run["runner_ckpt"]), str(tmp_path / "t.safetensors")])
        == 1
    )
    assert "teacher_trusted=True" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


def distill_config(teacher_run, mosaic, work: Path) -> Config:
    cfg = short_config("retinanet_r18_mosaic_distill.py", mosaic, work, STUDENT_EPOCHS)
    student = Config.fromfile(str(CONFIGS / "retinanet_r18_mosaic_student.py")).model
    student.test_cfg.score_thr = 0.0  # after 12 iterations few scores pass the shipped 0.05
    cfg.model.student = student
    teacher_model = copy.deepcopy(teacher_run["cfg"].model)
    cfg.model.teacher = teacher_model
    cfg.model.teacher_checkpoint = str(teacher_run["weights"])
    cfg.model.feature_losses = [
        dict(type="ChannelWiseFeatureLoss", temperature=4.0, weight=3.0),
        dict(type="NDFeatureLoss", weight=1.0),
        dict(type="FitNetFeatureLoss", weight=1.0, levels=[0, 1]),
    ]
    return cfg


def test_distillation_losses_fall_and_student_map_is_computed(teacher_run, mosaic, tmp_path):
    cfg = distill_config(teacher_run, mosaic, tmp_path)
    runner = Runner.from_cfg(cfg)
    model = runner.model
    assert isinstance(model, DistillingDetector)
    # the shipped student has 64 FPN channels, the teacher 128: projectors were built
    assert [type(p).__name__ for p in model.feature_losses[0].projectors] == ["Conv2d"] * 3
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()

    h = recorder.history
    for key in ("loss_distill_cwd", "loss_distill_nd", "loss_distill_fitnet", "loss_distill_kd"):
        values = h[key]
        assert len(values) == STUDENT_EPOCHS * 4 and all(math.isfinite(v) for v in values), key
    for key in ("loss_distill_cwd", "loss_distill_nd", "loss_distill_fitnet"):
        medians = epoch_medians(h[key])
        assert medians[-1] < medians[0], f"{key} did not fall: per-epoch medians {medians}"
    # Logit KD starts near 0 (both heads begin at RetinaNet's 0.01 prior and this teacher is weak),
    # and the focal loss pulls the student away from it during this short run. What the glue must
    # get right is the anchor layout and the gradient: optimised alone, the KD term falls.
    kd_falls_when_optimised(model, runner)
    assert "loss_cls" in h and "loss_bbox" in h  # the student's own detection losses are kept

    # the teacher stayed frozen: same weights (BatchNorm statistics included), eval mode, no grads
    assert not model.teacher.training
    after = model.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    assert all(p.grad is None for p in model.teacher.parameters())

    metrics = runner.val()  # mmdet's CocoMetric on the student's predictions
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0 and 0.0 <= metrics["coco/bbox_mAP_50"] <= 1.0

    # the distilled Runner checkpoint -> the student alone, loadable weights-only
    student_file = convert_checkpoint(
        tmp_path / f"epoch_{STUDENT_EPOCHS}.pth",
        tmp_path / "student.safetensors",
        trusted=True,
        prefix="student.",
    )
    student_state = read_state_dict(student_file)
    assert student_state.keys() == model.student.state_dict().keys()


def kd_falls_when_optimised(model: DistillingDetector, runner: Runner, steps: int = 5) -> None:
    batch = next(iter(runner.train_dataloader))
    data = model.data_preprocessor(batch, True)
    with torch.no_grad():
        s_feats = model.student.extract_feat(data["inputs"])
        t_scores = model.teacher.bbox_head(model.teacher.extract_feat(data["inputs"]))[0]
    head = model.student.bbox_head
    # lr 1e-3: at 1e-2 Adam's fixed-size first steps overshoot this small loss and it oscillates.
    opt = torch.optim.Adam(head.retina_cls.parameters(), lr=1e-3)
    values = []
    for _ in range(steps):
        loss = model.logit_loss(head(s_feats)[0], t_scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[-1] < values[0], values


def _two_stage(channels: int) -> dict:
    """A tiny Faster R-CNN (ResNet-18, FPN) in a test-sized config."""
    return dict(
        type="FasterRCNN",
        data_preprocessor=dict(
            type="DetDataPreprocessor",
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            pad_size_divisor=32,
        ),
        backbone=dict(
            type="ResNet", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), norm_eval=False
        ),
        neck=dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=channels, num_outs=4),
        rpn_head=dict(
            type="RPNHead",
            in_channels=channels,
            feat_channels=channels,
            anchor_generator=dict(
                type="AnchorGenerator", scales=[4], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32]
            ),
            bbox_coder=dict(
                type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4
            ),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(
                type="SingleRoIExtractor",
                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                out_channels=channels,
                featmap_strides=[4, 8, 16, 32],
            ),
            bbox_head=dict(
                type="Shared2FCBBoxHead",
                in_channels=channels,
                fc_out_channels=64,
                roi_feat_size=7,
                num_classes=10,
                bbox_coder=dict(
                    type="DeltaXYWHBBoxCoder",
                    target_means=[0.0] * 4,
                    target_stds=[0.1, 0.1, 0.2, 0.2],
                ),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            ),
        ),
        train_cfg=dict(
            rpn=dict(
                assigner=dict(
                    type="MaxIoUAssigner",
                    pos_iou_thr=0.7,
                    neg_iou_thr=0.3,
                    min_pos_iou=0.3,
                    ignore_iof_thr=-1,
                ),
                sampler=dict(
                    type="RandomSampler",
                    num=64,
                    pos_fraction=0.5,
                    neg_pos_ub=-1,
                    add_gt_as_proposals=False,
                ),
                allowed_border=-1,
                pos_weight=-1,
                debug=False,
            ),
            rpn_proposal=dict(
                nms_pre=200,
                max_per_img=100,
                nms=dict(type="nms", iou_threshold=0.7),
                min_bbox_size=0,
            ),
            rcnn=dict(
                assigner=dict(
                    type="MaxIoUAssigner",
                    pos_iou_thr=0.5,
                    neg_iou_thr=0.5,
                    min_pos_iou=0.5,
                    ignore_iof_thr=-1,
                ),
                sampler=dict(
                    type="RandomSampler",
                    num=64,
                    pos_fraction=0.25,
                    neg_pos_ub=-1,
                    add_gt_as_proposals=True,
                ),
                pos_weight=-1,
                debug=False,
            ),
        ),
        test_cfg=dict(
            rpn=dict(
                nms_pre=200,
                max_per_img=100,
                nms=dict(type="nms", iou_threshold=0.7),
                min_bbox_size=0,
            ),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=50),
        ),
    )


def _batch(mosaic: Path, cfg: Config, n: int = 2):
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    return pseudo_collate([dataset[i] for i in range(n)])


def test_two_stage_feature_distillation(mosaic, tmp_path):
    cfg = short_config("retinanet_r18_mosaic_student.py", mosaic, tmp_path, 1)
    model = DistillingDetector(
        student=_two_stage(32),
        teacher=_two_stage(64),  # random teacher: this checks the plumbing, not the learning
        feature_losses=[dict(type="FitNetFeatureLoss", weight=1.0), dict(type="NDFeatureLoss")],
    )
    data = model.data_preprocessor(_batch(mosaic, cfg), True)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert {"loss_rpn_cls", "loss_cls", "loss_distill_fitnet", "loss_distill_nd"} <= set(losses)
    total = sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k)
    total.backward()
    assert model.feature_losses[0].projectors[0].weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    assert "extract_feat" not in vars(model.student)  # the per-call wrapper is gone again

    with pytest.raises(ConfigError, match="single-stage"):
        DistillingDetector(
            student=_two_stage(32), teacher=_two_stage(32), logit_loss=dict(type="DenseLogitKDLoss")
        )


def test_bad_configs_name_the_problem(tmp_path):
    student = Config.fromfile(str(CONFIGS / "retinanet_r18_mosaic_student.py")).model
    teacher = copy.deepcopy(student)
    teacher.data_preprocessor.mean = [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="same normalisation"):
        DistillingDetector(student=student, teacher=teacher)
    wide = Config.fromfile(str(CONFIGS / "retinanet_r50_mosaic_teacher.py")).model
    with pytest.raises(ConfigError, match="projector=True"):
        DistillingDetector(
            student=student,
            teacher=wide,
            feature_losses=[dict(type="NDFeatureLoss", projector=False)],
        )
    with pytest.raises(ConfigError, match="out of range"):
        DistillingDetector(
            student=student, teacher=wide, feature_losses=[dict(type="NDFeatureLoss", levels=[5])]
        )
    with pytest.raises(CheckpointError, match="not found"):
        DistillingDetector(
            student=student, teacher=wide, teacher_checkpoint=str(tmp_path / "missing.pth")
        )
    with pytest.raises(ConfigError, match="config file not found"):
        DistillingDetector(student=student, teacher=str(tmp_path / "nope.py"))
    # weights of another architecture: one error listing the mismatches
    other = tmp_path / "student.safetensors"
    from mmdet.registry import MODELS
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in MODELS.build(copy.deepcopy(student)).state_dict().items()},
        str(other),
    )
    with pytest.raises(CheckpointError, match="shape mismatches|missing keys"):
        DistillingDetector(student=student, teacher=wide, teacher_checkpoint=str(other))
