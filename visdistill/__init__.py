"""visdistill: multi-teacher and cross-architecture knowledge distillation for timm models."""

from . import search, zoo
from .agglomerative_student import AgglomerativeStudent
from .callbacks import PredictionWriter
from .checkpoints import load_state_dict_file, load_weights_into
from .data import (
    CIFARDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    ShardsDataModule,
    VisionDataModule,
    convert_image_folder,
)
from .diagnostics import CKACallback, MinibatchCKA, cka_matrix, linear_cka, rbf_cka
from .errors import (
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    NonFiniteLossError,
    UnknownModelError,
    VisdistillError,
)
from .export import export_student
from .losses import dkd_loss, kd_loss, nd_loss, ofa_loss, soft_cross_entropy
from .models import Backbone, InputSpec, ModelConfig, ModelOutput, create_backbone
from .module import DistillationModule
from .probe_callbacks import KNNProbe, LinearProbe
from .probes import knn_classify, linear_probe, probe_exported
from .progress import LogLineProgressBar
from .schedulers import WarmupCosineLR
from .search import diswot_score
from .summary import DistillationModelSummary, RunSummary
from .teacher_source import CachedTeachers, LiveTeachers, TeacherSource
from .teachers import Teacher, TeacherEnsemble, ensemble_log_probs, ensemble_probs
from .terms import (
    DKD,
    KD,
    MEALV2,
    ND,
    OFA,
    TRG,
    UNIC,
    AdaptorHeads,
    DistillTerm,
    DisWOT,
    MSTRouting,
    TermOutput,
    list_terms,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptorHeads",
    "AgglomerativeStudent",
    "DKD",
    "DisWOT",
    "KD",
    "MEALV2",
    "MSTRouting",
    "ND",
    "OFA",
    "TRG",
    "UNIC",
    "Backbone",
    "CIFARDataModule",
    "CKACallback",
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "DigitsDataModule",
    "DistillTerm",
    "TermOutput",
    "list_terms",
    "TeacherSource",
    "LiveTeachers",
    "CachedTeachers",
    "DistillationModelSummary",
    "DistillationModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InputSpec",
    "KNNProbe",
    "LinearProbe",
    "LogLineProgressBar",
    "MinibatchCKA",
    "ModelConfig",
    "ModelOutput",
    "NonFiniteLossError",
    "PredictionWriter",
    "RunSummary",
    "ShardsDataModule",
    "Teacher",
    "TeacherEnsemble",
    "UnknownModelError",
    "VisdistillError",
    "VisionDataModule",
    "WarmupCosineLR",
    "cka_matrix",
    "convert_image_folder",
    "create_backbone",
    "ensemble_log_probs",
    "ensemble_probs",
    "diswot_score",
    "export_student",
    "dkd_loss",
    "kd_loss",
    "knn_classify",
    "nd_loss",
    "ofa_loss",
    "linear_cka",
    "linear_probe",
    "load_state_dict_file",
    "load_weights_into",
    "probe_exported",
    "rbf_cka",
    "soft_cross_entropy",
    "search",
    "zoo",
]
