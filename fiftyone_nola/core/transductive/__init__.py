"""Transductive labeling on stored embeddings, without training: TransCLIP (NeurIPS 2024), its
StatA safeguard (CVPR 2025) and ZLaP (CVPR 2024), over a kNN graph of O(N·k) memory.

Pure numpy / scipy / faiss; FiftyOne I/O lives in :mod:`fiftyone_nola.stages.transductive`.
"""

from fiftyone_nola.core.transductive.config import FEATURE_SPACES, METHODS, SEARCHES, TransductiveConfig
from fiftyone_nola.core.transductive.gmm import stata, transclip
from fiftyone_nola.core.transductive.graph import KnnGraph, knn_graph, knn_search
from fiftyone_nola.core.transductive.run import TransductiveResult, label, method_name, text_prior
from fiftyone_nola.core.transductive.zlap import ZlapResult, presence_check, zlap, zlap_inductive, zlap_probabilities

__all__ = [
    "FEATURE_SPACES",
    "METHODS",
    "SEARCHES",
    "KnnGraph",
    "TransductiveConfig",
    "TransductiveResult",
    "ZlapResult",
    "knn_graph",
    "knn_search",
    "label",
    "method_name",
    "presence_check",
    "stata",
    "text_prior",
    "transclip",
    "zlap",
    "zlap_inductive",
    "zlap_probabilities",
]
