"""FiftyOne plugin entry: registers the operators listed in fiftyone.yml.

Operators are thin: each parses its form into a library call in ``fiftyone_nola``.
"""

from . import _library  # noqa: F401  (first: makes fiftyone_nola importable for a downloaded plugin)
from .descriptions import GenerateDescriptions
from .embeddings import ComputeEmbeddings
from .labeling import ApplyModel, DinoLabels, Evaluate, TunePrompts, ZeroShot
from .multilabel import EvaluateMultiLabel, MultiLabelPseudoLabels, TrainMultiLabel
from .panels import NolaPanel
from .pipeline import AutoLabel
from .review import ExportAccepted, MarkReviewed, PropagateCorrections, RetrainWithCorrections, ReviewLowConfidence
from .sample_panel import NolaSampleReview
from .transductive import TransductiveLabels

OPERATORS = [
    ComputeEmbeddings,
    GenerateDescriptions,
    ZeroShot,
    DinoLabels,
    TunePrompts,
    ApplyModel,
    Evaluate,
    MultiLabelPseudoLabels,
    TrainMultiLabel,
    EvaluateMultiLabel,
    ReviewLowConfidence,
    MarkReviewed,
    RetrainWithCorrections,
    ExportAccepted,
    AutoLabel,
    PropagateCorrections,
    TransductiveLabels,
]
PANELS = [NolaPanel, NolaSampleReview]


def register(p):
    # The App server loads the plugin: make the FAISS similarity backend known in this process,
    # so no FIFTYONE_BRAIN_* variable has to be set before launching the App.
    from fiftyone_nola.stages.brain_backend import register_faiss_backend

    register_faiss_backend()
    for op in OPERATORS + PANELS:
        p.register(op)
