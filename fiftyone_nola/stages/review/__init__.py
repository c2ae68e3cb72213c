"""The review workspace on a FiftyOne dataset: what a threshold flags, the queue a reviewer
walks, their decisions, the sample view's card and correction suggestions, and the counts the
panel shows. The pure queue maths is :mod:`fiftyone_nola.core.review_queue`; the tag and field
names are :mod:`fiftyone_nola.core.names`.

Every action costs what it changes, not the dataset's size: tags are updated by the database on
filters its indexes answer, counts come from one aggregation, and the queue's order is stored
for its head only.
"""

from fiftyone_nola.core.names import (
    ACCEPTED_TAG,
    CORRECTED_TAG,
    CORRECTIONS_FIELD,
    DECIDED_TAGS,
    DEFAULT_THRESHOLD,
    EXPORTABLE_TAGS,
    FLAGGED_TAG,
    QUEUE_FIELD,
    REJECTED_TAG,
    REVIEW_TAG,
    STAGE_FIELDS,
    SUGGESTED_FIELD,
    SUGGESTED_TAG,
)
from fiftyone_nola.stages.review._db import data_version, ensure_review_schema, one_review_writer, reload_dataset
from fiftyone_nola.stages.review.card import neighbours, open_store, sample_card, suggestions
from fiftyone_nola.stages.review.decisions import (
    accept_above,
    check_class,
    class_list,
    decide,
    propagate_corrections,
    set_status,
    store_class_list,
)
from fiftyone_nola.stages.review.flagging import (
    QUEUE_HEAD,
    SETTINGS_KEY,
    VIEW_DISAGREE,
    VIEW_FLAGGED,
    VIEW_FLAGGED_PER_CLASS,
    VIEW_QUEUE,
    applied_threshold,
    flag_samples,
    next_in_queue,
    predictions_version,
    queue_ids,
    queue_length,
    queue_view,
    rank_queue,
    review_field,
    save_views,
    settings,
)
from fiftyone_nola.stages.review.stats import ReviewCounts, progress, summary

__all__ = [
    "ACCEPTED_TAG",
    "CORRECTED_TAG",
    "CORRECTIONS_FIELD",
    "DECIDED_TAGS",
    "DEFAULT_THRESHOLD",
    "EXPORTABLE_TAGS",
    "FLAGGED_TAG",
    "QUEUE_FIELD",
    "QUEUE_HEAD",
    "REJECTED_TAG",
    "REVIEW_TAG",
    "SETTINGS_KEY",
    "STAGE_FIELDS",
    "SUGGESTED_FIELD",
    "SUGGESTED_TAG",
    "VIEW_DISAGREE",
    "VIEW_FLAGGED",
    "VIEW_FLAGGED_PER_CLASS",
    "VIEW_QUEUE",
    "ReviewCounts",
    "accept_above",
    "applied_threshold",
    "check_class",
    "class_list",
    "data_version",
    "decide",
    "ensure_review_schema",
    "flag_samples",
    "neighbours",
    "one_review_writer",
    "next_in_queue",
    "open_store",
    "predictions_version",
    "progress",
    "propagate_corrections",
    "queue_ids",
    "queue_length",
    "queue_view",
    "rank_queue",
    "reload_dataset",
    "review_field",
    "sample_card",
    "save_views",
    "set_status",
    "settings",
    "store_class_list",
    "suggestions",
    "summary",
]
