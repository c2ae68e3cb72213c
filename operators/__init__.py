"""FiftyOne plugin entry: registers the operators listed in fiftyone.yml.

Operators are thin: each parses its form into a library call in ``fiftyone_nola``.
"""

from .descriptions import GenerateDescriptions
from .embeddings import ComputeEmbeddings
from .labeling import ApplyModel, DinoLabels, Evaluate, TunePrompts, ZeroShot
from .multilabel import EvaluateMultiLabel, MultiLabelPseudoLabels, TrainMultiLabel
from .pipeline import AutoLabel
from .review import ExportAccepted, MarkReviewed, RetrainWithCorrections, ReviewLowConfidence

OPERATORS = [
    ComputeEmbeddings, GenerateDescriptions, ZeroShot, DinoLabels, TunePrompts, ApplyModel, Evaluate,
    MultiLabelPseudoLabels, TrainMultiLabel, EvaluateMultiLabel,
    ReviewLowConfidence, MarkReviewed, RetrainWithCorrections, ExportAccepted, AutoLabel,
]


def register(p):
    for op in OPERATORS:
        p.register(op)
