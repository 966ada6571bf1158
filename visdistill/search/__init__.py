"""Training-free student search: DisWOT scores (Dong, Li, Wei, CVPR 2023), timm search
spaces with cost constraints, exhaustive ranking and regularised evolution;
:func:`run_search` runs a whole search (``visdistill search``)."""

from .evolution import (
    CandidateError,
    Evaluated,
    RegularizedEvolution,
    SearchResult,
    exhaustive_search,
    rank,
    search,
    select_parent,
)
from .run import run_search
from .scores import DisWOTScore, DisWOTScorer, classifier_weight, diswot_score, gaussian_init_
from .spaces import (
    FAMILIES,
    Candidate,
    CandidateList,
    Constraints,
    Cost,
    GeneSpace,
    MobileNetV3Space,
    ModelListSpace,
    ResNetSpace,
    SearchSpace,
    measure_cost,
    parse_space,
)

__all__ = [
    "FAMILIES",
    "Candidate",
    "CandidateError",
    "CandidateList",
    "Constraints",
    "Cost",
    "DisWOTScore",
    "DisWOTScorer",
    "Evaluated",
    "GeneSpace",
    "MobileNetV3Space",
    "ModelListSpace",
    "RegularizedEvolution",
    "ResNetSpace",
    "SearchResult",
    "SearchSpace",
    "classifier_weight",
    "diswot_score",
    "exhaustive_search",
    "gaussian_init_",
    "measure_cost",
    "parse_space",
    "rank",
    "run_search",
    "search",
    "select_parent",
]
