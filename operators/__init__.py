"""FiftyOne plugin entry: registers the operators listed in fiftyone.yml.

Operators are thin: each parses its form into a library call in ``fiftyone_nola``.
"""

from .embeddings import ComputeEmbeddings
from .labeling import ApplyModel, DinoLabels, Evaluate, TunePrompts, ZeroShot
from .pipeline import AutoLabel

OPERATORS = [ComputeEmbeddings, ZeroShot, DinoLabels, TunePrompts, ApplyModel, Evaluate, AutoLabel]


def register(p):
    for op in OPERATORS:
        p.register(op)
