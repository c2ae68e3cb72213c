"""CDUL multi-label auto-labeling: global + local CLIP pseudo-labels, a classifier trained
with gradient-alignment label updates, decision rules and evaluation (no FiftyOne here).

Pipeline (CDUL, Abdelfattah et al., ICCV 2023, arXiv 2307.16634; README, "Limitations and differences from the papers"):

1. ``global_scores``: softmax over classes of CLIP image-text cosines of the whole image.
2. ``local_clip_scores``: the same per crop of a ``grid × grid`` tiling of each image.
3. ``aggregate_scores``: per class, max (or min, below a threshold ``t``) over crops, averaged
   with the global score; the initial soft labels.
4. ``train_multilabel_classifier``: a head on cached features fitted to the soft labels, whose
   labels are themselves refined every few epochs along the loss gradient.
5. ``decide_labels``: turn scores into label sets; ``mean_average_precision`` et al. evaluate.

Score arrays use NaN for "unknown" (unreadable image, missing crop); every function here
ignores or propagates NaN rather than treating it as a score.

Modules: ``crops`` (1-2), ``pseudo_labels`` (3, 5), ``train`` (4), ``classifier`` (the head,
its scores and saved form), ``evaluation``.
"""

from fiftyone_nola.core.cdul.classifier import (
    HEAD_FORMAT,
    SCORE_FOR_LOSS,
    SCORES,
    MultiLabelHead,
    head_score,
    load_classifier,
    predict_multilabel,
    save_classifier,
)
from fiftyone_nola.core.cdul.crops import (
    CLIP_LOGIT_SCALE,
    CropConfig,
    CropDataset,
    GridCrops,
    global_scores,
    grid_boxes,
    local_clip_scores,
)
from fiftyone_nola.core.cdul.evaluation import average_precision_per_class, mean_average_precision, precision_recall_at
from fiftyone_nola.core.cdul.pseudo_labels import RULES, aggregate_scores, decide_labels, local_only
from fiftyone_nola.core.cdul.train import (
    CPU_SCHEDULE,
    LABEL_EPS,
    LOSSES,
    PAPER_SCHEDULE,
    REFERENCE_LABEL_LR,
    TrainConfig,
    label_gradient,
    label_update,
    per_sample_label_loss,
    per_sample_loss,
    psi,
    schedule_message,
    train_multilabel_classifier,
)

__all__ = [
    "CLIP_LOGIT_SCALE",
    "CPU_SCHEDULE",
    "HEAD_FORMAT",
    "LABEL_EPS",
    "LOSSES",
    "PAPER_SCHEDULE",
    "REFERENCE_LABEL_LR",
    "RULES",
    "SCORES",
    "SCORE_FOR_LOSS",
    "CropConfig",
    "CropDataset",
    "GridCrops",
    "MultiLabelHead",
    "TrainConfig",
    "aggregate_scores",
    "average_precision_per_class",
    "decide_labels",
    "global_scores",
    "grid_boxes",
    "head_score",
    "label_gradient",
    "label_update",
    "load_classifier",
    "local_clip_scores",
    "local_only",
    "mean_average_precision",
    "per_sample_label_loss",
    "per_sample_loss",
    "precision_recall_at",
    "predict_multilabel",
    "psi",
    "save_classifier",
    "schedule_message",
    "train_multilabel_classifier",
]
