"""One validation pass over a job's inputs, run before any stage does work.

Every entry point (``auto_label``, ``auto_label_multilabel``, the CLI commands, the operators)
calls into this module first. Each check returns :class:`Problem` items instead of raising, so
all the mistakes of a job are reported together, each naming its input and saying what to do.
Nothing here writes: no dataset, no directory, no run record, no cache.

``fiftyone_nola.validate(...)`` (also ``python -m fiftyone_nola auto-label ... --check``) runs only this pass
and returns a :class:`Report` with the plan: stages to run or reuse, an estimated time from the
hardware profile, and the disk the stores will need.
"""

from fiftyone_nola.core.errors import ValidationError
from fiftyone_nola.stages.validation.checks import (
    _weights,
    check_classes,
    check_clip,
    check_descriptions,
    check_device,
    check_dino,
    check_gt_field,
    check_images,
    check_output_fields,
    check_range,
    check_templates,
    check_writable,
)
from fiftyone_nola.stages.validation.jobs import check_auto_label, check_embed, check_multilabel, replace_random_init
from fiftyone_nola.stages.validation.params import ParamChecks, check_params
from fiftyone_nola.stages.validation.plan import plan_auto_label
from fiftyone_nola.stages.validation.report import Problem, Report, plan_lines
from fiftyone_nola.stages.validation.target import Target, resolve_target, target_count

__all__ = [
    "ParamChecks",
    "Problem",
    "Report",
    "Target",
    "ValidationError",
    "check_auto_label",
    "check_classes",
    "check_clip",
    "check_descriptions",
    "check_device",
    "check_dino",
    "check_embed",
    "check_gt_field",
    "check_images",
    "check_multilabel",
    "check_output_fields",
    "check_params",
    "check_range",
    "check_templates",
    "check_writable",
    "plan_auto_label",
    "plan_lines",
    "replace_random_init",
    "resolve_target",
    "target_count",
    "_weights",
]
