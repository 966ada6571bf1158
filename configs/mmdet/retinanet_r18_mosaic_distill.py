# Distillation: the ResNet-50 RetinaNet teacher (frozen) -> the ResNet-18 student, trained with the
# student's own schedule. Losses: channel-wise distillation on the three FPN levels (Shu et al. 2021)
# + sigmoid logit KD on every anchor. Swap or add NDFeatureLoss / FitNetFeatureLoss the same way.
#   python -m visdistill.integrations.mmdet train configs/mmdet/retinanet_r18_mosaic_distill.py
#   python -m visdistill.integrations.mmdet convert work_dirs/retinanet_r18_mosaic_distill/epoch_8.pth \
#       work_dirs/student_r18_distilled.safetensors --trusted --prefix student.
_base_ = ["./retinanet_r18_mosaic_student.py"]
custom_imports = dict(imports=["visdistill.integrations.mmdet"], allow_failed_imports=False)
model = dict(
    _delete_=True,
    type="DistillingDetector",
    student="{{fileDirname}}/retinanet_r18_mosaic_student.py",  # a config file's `model`, or a dict
    teacher="{{fileDirname}}/retinanet_r50_mosaic_teacher.py",
    teacher_checkpoint="work_dirs/teacher_r50.safetensors",  # weights-only; see the teacher config
    feature_losses=[
        dict(type="ChannelWiseFeatureLoss", temperature=4.0, weight=3.0),
        # dict(type="NDFeatureLoss", weight=1.0),
        # dict(type="FitNetFeatureLoss", weight=1.0, levels=[0, 1, 2]),
    ],
    logit_loss=dict(type="DenseLogitKDLoss", temperature=1.0, weight=1.0),
)
