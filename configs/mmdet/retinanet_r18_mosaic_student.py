# Student: RetinaNet, ResNet-18, FPN P3-P5 with 64 channels, 2 stacked head convs.
#   python -m visdistill.integrations.mmdet train configs/mmdet/retinanet_r18_mosaic_student.py
_base_ = ["./_base_/retinanet_mosaic.py"]
