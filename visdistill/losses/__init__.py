"""Pure loss functions: tensors in, tensor out, no parameters."""

from .detection import (
    binary_kd_loss,
    channel_wise_loss,
    fitnet_loss,
    nd_feature_loss,
    softmax_kd_loss,
)
from .diswot import (
    ickd_distance,
    relation_similarity,
    semantic_similarity,
    similarity_preserving_distance,
)
from .dkd import dkd_loss
from .kd import kd_loss, soft_cross_entropy
from .multi_teacher import (
    discriminator_loss,
    feature_match_loss,
    fold_expert_weights,
    load_balancing_loss,
    teacher_drop_coefficients,
    teacher_weighted_mean,
    topk_weights,
)
from .nd import nd_loss
from .ofa import ofa_loss
from .trg import (
    cosine_temperature,
    feature_map_tokens,
    trg_contextual_loss,
    trg_global_loss,
    trg_local_loss,
)

__all__ = [
    "binary_kd_loss",
    "channel_wise_loss",
    "fitnet_loss",
    "nd_feature_loss",
    "softmax_kd_loss",
    "cosine_temperature",
    "discriminator_loss",
    "dkd_loss",
    "ickd_distance",
    "relation_similarity",
    "semantic_similarity",
    "similarity_preserving_distance",
    "feature_match_loss",
    "feature_map_tokens",
    "kd_loss",
    "load_balancing_loss",
    "nd_loss",
    "ofa_loss",
    "soft_cross_entropy",
    "teacher_drop_coefficients",
    "teacher_weighted_mean",
    "topk_weights",
    "trg_contextual_loss",
    "trg_global_loss",
    "trg_local_loss",
    "fold_expert_weights",
]
