"""visdistill: multi-teacher and cross-architecture knowledge distillation for timm models."""

from .callbacks import PredictionWriter
from .checkpoints import load_state_dict_file, load_weights_into
from .data import (
    CIFARDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    VisionDataModule,
)
from .distillers import KD, DistillTerm
from .errors import (
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    UnknownModelError,
    VisdistillError,
)
from .export import export_student
from .losses import kd_loss, soft_cross_entropy
from .models import Backbone, InputSpec, ModelConfig, ModelOutput, create_backbone
from .module import DistillationModule
from .teachers import Teacher, TeacherEnsemble, ensemble_probs

__version__ = "0.1.0"

__all__ = [
    "KD",
    "Backbone",
    "CIFARDataModule",
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "DigitsDataModule",
    "DistillTerm",
    "DistillationModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InputSpec",
    "ModelConfig",
    "ModelOutput",
    "PredictionWriter",
    "Teacher",
    "TeacherEnsemble",
    "UnknownModelError",
    "VisdistillError",
    "VisionDataModule",
    "create_backbone",
    "ensemble_probs",
    "export_student",
    "kd_loss",
    "load_state_dict_file",
    "load_weights_into",
    "soft_cross_entropy",
]
