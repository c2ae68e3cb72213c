"""Names every layer shares: the fields the stages write, the review's tags and fields, and the
default review threshold. One definition each, so a form, the CLI and a stage never disagree."""

from __future__ import annotations

# Fields the single-label pipeline writes (``Classification`` with a confidence).
PREDICTIONS_FIELD = "nola"
ZEROSHOT_FIELD = "nola_zeroshot"
DINO_FIELD = "nola_dino"
STAGE_FIELDS = (ZEROSHOT_FIELD, DINO_FIELD, PREDICTIONS_FIELD)

# Review: a reviewer's label goes to its own field, never over a model's.
CORRECTIONS_FIELD = "nola_reviewed"
SUGGESTED_FIELD = "nola_suggested"  # a correction propagated to a neighbour: never a decision
QUEUE_FIELD = "nola_queue_priority"  # the queue's head, highest first (unset beyond the head)

# Review tags. Flagged: selected by the last flagging (threshold / bottom-k), kept after review.
# Queue: flagged or suggested, and not decided. A sample carries at most one decision tag.
FLAGGED_TAG = "nola:flagged"
REVIEW_TAG = "nola:review"
ACCEPTED_TAG = "nola:accepted"  # the model's label is right
CORRECTED_TAG = "nola:corrected"  # the reviewer's label (in CORRECTIONS_FIELD) replaces it
REJECTED_TAG = "nola:rejected"  # no label fits: never exported
SUGGESTED_TAG = "nola:suggested"
DECIDED_TAGS = (ACCEPTED_TAG, CORRECTED_TAG, REJECTED_TAG)
EXPORTABLE_TAGS = (ACCEPTED_TAG, CORRECTED_TAG)

REVIEW_SETTINGS_KEY = "nola_review"  # dataset info: the last flagging's settings (its field, threshold)

DEFAULT_THRESHOLD = 0.5  # flag predictions below this confidence for review
