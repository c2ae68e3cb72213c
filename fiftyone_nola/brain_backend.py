"""Old dotted path of the Brain "faiss" backend, kept importable.

Datasets written by fiftyone-nola 0.1 store ``fiftyone_nola.brain_backend.FaissSimilarityConfig``
in their Brain similarity runs, and users may have it in ``brain_config.json`` or
``FIFTYONE_BRAIN_SIMILARITY_FAISS_CONFIG_CLS``; the code lives in
:mod:`fiftyone_nola.stages.brain_backend`.
"""

from fiftyone_nola.stages.brain_backend import FaissSimilarity, FaissSimilarityConfig, FaissSimilarityIndex  # noqa: F401
