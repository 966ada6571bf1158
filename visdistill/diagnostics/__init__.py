"""Representation diagnostics: CKA between teacher and student layers."""

from .accumulator import MinibatchCKA, NoCKABatchesError
from .callback import CKACallback
from .cka import center_gram, cka_from_grams, gram_linear, gram_rbf, hsic1, linear_cka, rbf_cka
from .heatmap import cka_matrix, plot_cka, save_cka

__all__ = [
    "CKACallback",
    "MinibatchCKA",
    "NoCKABatchesError",
    "center_gram",
    "cka_from_grams",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic1",
    "linear_cka",
    "plot_cka",
    "rbf_cka",
    "save_cka",
]
