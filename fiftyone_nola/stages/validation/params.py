"""The validation pass of one stage (an operator's form): the checks it names, by input."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fiftyone_nola.core.storage import nola_home
from fiftyone_nola.stages.artifacts import stage_dir
from fiftyone_nola.stages.validation.checks import (
    check_classes,
    check_clip,
    check_descriptions,
    check_device,
    check_dino,
    check_gt_field,
    check_output_fields,
    check_range,
    check_templates,
    check_writable,
)
from fiftyone_nola.stages.validation.report import Report, _problem
from fiftyone_nola.stages.validation.target import Target, resolve_target

_UNSET = object()


@dataclass
class ParamChecks:
    """What :func:`check_params` checks; every field is optional (None / empty: not checked).

    ``fields``: input -> (field name, label type names) that must exist; ``stages``: input ->
    (field, what) whose stage must have run; ``ranges``: input -> (value, lo, hi, integer);
    ``writable``: input -> (path, what, is_file); ``files``: input -> a path that must exist.
    """

    classes: Any = _UNSET
    min_classes: int = 2
    descriptions_file: Optional[str] = None
    allow_template_fallback: bool = True
    templates: Optional[str] = None
    clip: Any = None
    prompt_tuning: bool = False  # the stage prompt-tunes ``clip``: its tower must take prompts
    dino: Any = None
    fallback_random_init: bool = False
    device: Optional[str] = None
    gt_field: Optional[str] = None
    gt_multilabel: bool = False
    outputs: Optional[Mapping[str, str]] = None
    output_type: str = "Classification"
    fields: Optional[Mapping[str, tuple]] = None
    stages: Optional[Mapping[str, tuple]] = None
    ranges: Optional[Mapping[str, tuple]] = None
    writable: Optional[Mapping[str, tuple]] = None
    files: Optional[Mapping[str, str]] = None
    need_samples: bool = True


def check_params(samples, **inputs) -> Report:
    """The checks a single stage (an operator) needs, by input name (see :class:`ParamChecks`)."""
    t0 = time.perf_counter()
    c = ParamChecks(**inputs)
    problems: list = []
    if samples is not None and c.need_samples:
        _, problems = resolve_target(Target(samples=samples))
    names = None
    if c.classes is not _UNSET:
        names, p = check_classes(c.classes, samples, c.min_classes)
        problems += p
    problems += check_descriptions(c.descriptions_file, names, c.allow_template_fallback)
    problems += check_templates(c.templates, names)
    problems += check_clip(c.clip, c.fallback_random_init, prompts=c.prompt_tuning)
    problems += check_dino(c.dino, c.fallback_random_init)
    problems += check_device(c.device)
    outputs = dict(c.outputs or {})
    problems += check_output_fields(samples, outputs, c.output_type)
    problems += check_gt_field(samples, c.gt_field, names, c.gt_multilabel, list(outputs.values()))
    problems += check_fields(samples, c.fields or {})
    problems += _check_stages(samples, c.stages or {})
    for inp, (v, lo, hi, integer) in (c.ranges or {}).items():
        problems += check_range(inp, v, lo, hi, integer=integer)
    for inp, (path, what, is_file) in (c.writable or {}).items():
        problems += check_writable(path, inp, what, is_file)
    problems += _check_files(c.files or {})
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    r = Report(problems)
    r.seconds = time.perf_counter() - t0
    return r


def check_fields(samples, fields: Mapping[str, tuple]) -> list:
    """Each named field exists on ``samples`` and holds one of the given label types."""
    problems: list = []
    schema = samples.get_field_schema(flat=True) if samples is not None and fields else {}
    for inp, (f, kinds) in fields.items():
        if not f:
            problems.append(_problem(inp, "a field name is required"))
            continue
        if f not in schema:
            problems.append(
                _problem(
                    inp,
                    f"field {f!r} does not exist on this dataset",
                    "pick an existing field, or run the stage that writes it first",
                )
            )
            continue
        doc = getattr(schema[f], "document_type", None)
        if kinds and (doc is None or doc.__name__ not in kinds):
            problems.append(
                _problem(
                    inp,
                    f"field {f!r} holds {getattr(doc, '__name__', 'no labels')}, not {'/'.join(kinds)}",
                    "pick a field of that label type",
                )
            )
    return problems


def _check_stages(samples, stages: Mapping[str, tuple]) -> list:
    """Each named stage has stored its outputs for ``samples``."""
    if samples is None:
        return []
    return [
        _problem(
            inp,
            f"the {what} stage has not been run into {f!r} on this dataset",
            f"run the {what} stage first, or name the field it wrote",
        )
        for inp, (f, what) in stages.items()
        if f and not (stage_dir(samples, f) / "meta.json").exists()
    ]


def _check_files(files: Mapping[str, str]) -> list:
    problems: list = []
    for inp, path in files.items():
        if not path:
            problems.append(_problem(inp, "a path is required"))
        elif not Path(path).expanduser().exists():
            problems.append(_problem(inp, f"{path} does not exist", "give an existing path"))
    return problems
