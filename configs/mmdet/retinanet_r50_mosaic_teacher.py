# Teacher: RetinaNet, ResNet-50, FPN P3-P5 with 128 channels (wider than the student's 64, so the
# feature terms build 1x1-conv projectors), same anchors and classes as the student.
#   python -m visdistill.integrations.mmdet train configs/mmdet/retinanet_r50_mosaic_teacher.py
#   python -m visdistill.integrations.mmdet convert \
#       work_dirs/retinanet_r50_mosaic_teacher/epoch_8.pth work_dirs/teacher_r50.safetensors --trusted
_base_ = ["./_base_/retinanet_mosaic.py"]
fpn_channels = 128
model = dict(
    backbone=dict(depth=50),
    neck=dict(in_channels=[512, 1024, 2048], out_channels=fpn_channels),
    bbox_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels),
)
