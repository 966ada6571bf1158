# RetinaNet (ResNet-18 by default) sized for 128 px mosaics, trained from scratch (no pretrained download) on CPU.
# FPN levels P3-P5 (strides 8, 16, 32): items are 10-56 px, P6/P7 would be 2x2 and 1x1 maps.
_base_ = ["./mosaic_detection.py"]

default_scope = "mmdet"
fpn_channels = 64  # children that change it also set bbox_head in_channels / feat_channels

model = dict(
    type="RetinaNet",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32,
    ),
    backbone=dict(
        type="ResNet",
        depth=18,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
    ),
    neck=dict(
        type="FPN",
        in_channels=[128, 256, 512],  # ResNet-18/34 stages 2-4
        out_channels=fpn_channels,
        start_level=0,
        num_outs=3,
    ),
    bbox_head=dict(
        type="RetinaHead",
        num_classes=10,
        in_channels=fpn_channels,
        stacked_convs=2,
        feat_channels=fpn_channels,
        anchor_generator=dict(
            type="AnchorGenerator",
            octave_base_scale=3,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32],
        ),
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder",
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0],
        ),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    train_cfg=dict(
        assigner=dict(
            type="MaxIoUAssigner",
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1,
        ),
        sampler=dict(type="PseudoSampler"),
        allowed_border=-1,
        pos_weight=-1,
        debug=False,
    ),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type="nms", iou_threshold=0.5),
        max_per_img=100,
    ),
)

# Short CPU schedule (measured in docs/mmdet.md: 32 mosaics, batch 4, 8 epochs = 64 iterations):
# AdamW from scratch, linear warm-up over 8 iterations, x0.1 at epoch 6; evaluated at the end.
max_epochs = 8
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=8),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[6], gamma=0.1),
]

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=10),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=max_epochs, max_keep_ckpts=1),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=10, by_epoch=True)
log_level = "WARNING"
load_from = None
resume = False
randomness = dict(seed=0)
