"""Form pieces and parameter parsing shared by the operators (App, Python and delegated alike).

Every operator reads its parameters through these helpers, so a parameter means the same thing
whether it came from the App form, ``foo.execute_operator(..., params=...)`` or a delegated run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from typing import Optional

import fiftyone.operators.types as types

from fiftyone_nola import logs
from fiftyone_nola.core.config import given, given_in  # noqa: F401  (the operators' config rule)
from fiftyone_nola.core.engines import ENGINES, PRECISIONS
from fiftyone_nola.core.models import ClipSpec, DinoSpec, random_init_default

DEVICES = ["auto", "cpu", "cuda"]


def operator_config(name: str, label: str, description: str, delegated: bool = True, default_delegated: bool = False):
    """The config every NoLA operator shares: dynamic form, immediate and (long work) delegated runs."""
    import fiftyone.operators as foo

    return foo.OperatorConfig(
        name=name,
        label=label,
        description=description,
        dynamic=True,
        allow_immediate_execution=True,
        allow_delegated_execution=delegated,
        default_choice_to_delegated=default_delegated,
    )


def target_samples(ctx):
    """The samples to act on: dataset, current view or selected samples (App's target choice).

    With no explicit target (Python and delegated calls), selected samples win over the view,
    as the App's form pre-selects "selected samples" when there is a selection.
    """
    target = ctx.params.get("view_target") or ctx.request_params.get("view_target")
    if not target and ctx.selected:
        ctx.target_view()  # keeps the App's automatic target input in the form
        return ctx.view.select(ctx.selected)
    return ctx.target_view()


def param(ctx, name: str, default):
    """A parameter that may legitimately be falsy (0, 0.0, False): only None means "not given"."""
    v = ctx.params.get(name)
    return default if v is None else type(default)(v)


def text(ctx, name: str, default=None):
    """A text parameter: None or an empty box means "not given"."""
    v = ctx.params.get(name)
    return default if v in (None, "") else v


def field_default(cls, name: str):
    """The library's default of dataclass field ``name``: what a form shows and what runs when blank."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def arg_param(ctx, name: str, fn):
    """A text parameter whose default is that of argument ``name`` of library function ``fn``."""
    return text(ctx, name, arg_default(fn, name))


def text_inputs_check(ctx) -> dict:
    """The form checks every operator that embeds class texts shares: classes, descriptions, CLIP, device."""
    return dict(
        classes=classes_param(ctx),
        descriptions_file=text(ctx, "descriptions_file"),
        allow_template_fallback=bool(ctx.params.get("allow_template_fallback")),
        clip=clip_spec(ctx),
        device=device_param(ctx),
    )


def arg_default(fn, name: str):
    """The default of argument ``name`` of library function ``fn`` (a form's default)."""
    return inspect.signature(fn).parameters[name].default


def progress_fn(ctx, every_s: float = 1.0):
    """A library progress callback that forwards to the App / the delegated-operation record."""
    last = [0.0]

    def fn(done: int, total: int, message: str = "") -> None:
        if not total and message:  # a message with no count, e.g. what the job waits for
            ctx.set_progress(progress=0.0, label=message)
            return
        now = time.monotonic()
        if done < total and now - last[0] < every_s:
            return
        last[0] = now
        ctx.set_progress(progress=(done / total) if total else 1.0, label=f"{message} {done}/{total}")

    return fn


def collected_log(lines: list):
    """Appends the library's log lines of this operator's run (its thread's only) to ``lines``."""
    return logs.lines_to(lines.append, this_thread=True)


def add_device_input(inputs) -> None:
    inputs.enum(
        "device",
        DEVICES,
        default="auto",
        label="Device",
        description="auto picks CUDA when present, else CPU",
        view=types.DropdownView(),
    )


def add_engine_inputs(inputs, config_cls) -> None:
    """What runs the inference passes; defaults read from ``config_cls`` (EmbedConfig, PredictConfig)."""
    inputs.enum(
        "engine",
        list(ENGINES),
        default=field_default(config_cls, "engine"),
        label="Inference engine",
        description="auto: measured on your images, PyTorch or OpenVINO (int8/bf16 where the CPU "
        "has them), the fastest that agrees with PyTorch; openvino converts once and caches the model",
        view=types.DropdownView(),
    )
    inputs.enum(
        "precision",
        list(PRECISIONS),
        default=field_default(config_cls, "precision"),
        label="Precision",
        description="int8 needs engine openvino (calibrated on 64 of your images)",
        view=types.DropdownView(),
    )


def engine_params(ctx) -> dict:
    """The engine and precision the user set, and nothing else (the config's defaults apply)."""
    return {k: v for k in ("engine", "precision") if (v := text(ctx, k)) is not None}


def device_param(ctx):
    d = text(ctx, "device")
    return None if d == "auto" else d


def add_clip_inputs(inputs) -> None:
    inputs.str("clip_arch", default=field_default(ClipSpec, "arch"), label="CLIP architecture (open_clip)")
    inputs.str(
        "clip_pretrained",
        default=field_default(ClipSpec, "pretrained"),
        label="CLIP weights",
        description="open_clip pretrained tag, or a local checkpoint file",
    )


def add_dino_inputs(inputs) -> None:
    inputs.str(
        "dino_model",
        default=field_default(DinoSpec, "name"),
        label="DINO model (timm)",
        description="auto: the paper's vit_base_patch16_224.dino on a GPU, vit_small_patch16_224.dino on a CPU",
    )
    inputs.str("dino_checkpoint", required=False, label="DINO weights file (optional)")


def add_templates_input(inputs) -> None:
    """The template set: a dropdown of presets (default: the official code's choice) or a file."""
    from fiftyone_nola.core.templates import AUTO, presets
    from fiftyone_nola.stages.nola import ZeroShotConfig

    choices = types.Choices()
    choices.add_choice(AUTO, label="auto (official choice: cifar10 for CIFAR-10 classes, else imagenet)")
    for name, tpl in sorted(presets().items()):
        choices.add_choice(name, label=f"{name} ({len(tpl)} templates)")
    inputs.enum(
        "templates",
        choices.values(),
        default=field_default(ZeroShotConfig, "templates"),
        label="Prompt templates",
        view=choices,
        description="added to each class's descriptions before averaging (NoLA)",
    )
    inputs.str(
        "templates_file",
        required=False,
        label="Templates file (optional, overrides the preset)",
        description="a JSON list or one template per line, each with {} for the class name",
    )


def templates_param(ctx):
    """The templates file when given, else the chosen preset; None: the library's default."""
    return text(ctx, "templates_file") or text(ctx, "templates")


def add_random_init_input(inputs) -> None:
    inputs.bool(
        "random_init",
        default=random_init_default(),
        label="Random initialisation",
        description="smoke runs only: labels from random weights are meaningless",
    )


def clip_spec(ctx) -> ClipSpec:
    return given(
        ClipSpec,
        arch=text(ctx, "clip_arch"),
        pretrained=text(ctx, "clip_pretrained"),
        random_init=ctx.params.get("random_init"),
    )


def dino_spec(ctx) -> DinoSpec:
    return given(
        DinoSpec,
        name=text(ctx, "dino_model"),
        checkpoint=text(ctx, "dino_checkpoint"),
        random_init=ctx.params.get("random_init"),
    )


def add_classes_input(ctx, inputs) -> None:
    default = ", ".join(getattr(ctx.dataset, "default_classes", None) or [])
    inputs.str(
        "classes",
        default=default or None,
        required=not default,
        label="Class names",
        description="comma-separated; defaults to the dataset's default_classes",
    )


def classes_param(ctx):
    return text(ctx, "classes")


def label_fields(ctx, types_=("Classification",)) -> list:
    """Names of the dataset's fields holding one of the given label types."""
    import fiftyone as fo

    wanted = tuple(getattr(fo, t) for t in types_)
    schema = ctx.dataset.get_field_schema(embedded_doc_type=wanted) if ctx.dataset else {}
    return sorted(schema)


def add_field_choice(ctx, inputs, name, label, types_=("Classification",), default=None, required=True):
    choices = label_fields(ctx, types_)
    if not choices:
        inputs.str(name, default=default, required=required, label=label)
        return
    inputs.enum(
        name,
        choices,
        default=default if default in choices else choices[0],
        required=required,
        label=label,
        view=types.DropdownView(),
    )


def jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def check_form(ctx, inputs, check, names=None):
    """Run the library's validation pass on the form's current params, before Execute.

    Each problem is shown next to its input (``invalid`` + ``error_message``: the App highlights
    it, and ``execute_operator`` / delegated runs refuse with a validation error); problems of the
    job as a whole (empty view, unwritable NOLA_HOME) go in an error notice, warnings in a
    warning notice. ``check()`` returns a ``validation.Report``; ``names`` maps its input names
    to this form's property names.
    """
    from fiftyone_nola.core.errors import NolaError
    from fiftyone_nola.stages.validation import Problem, Report

    if ctx.dataset is None:
        return None
    try:
        report = check()
    except NolaError as e:
        report = Report([Problem("", str(e))])
    names = names or {}
    loose = []
    for p in report.errors:
        prop = inputs.properties.get(names.get(p.input, p.input))
        if prop is None or isinstance(prop.type, types.Void):
            loose.append(p)
            continue
        msg = p.render()
        prop.error_message = f"{prop.error_message}; {msg}" if prop.invalid and prop.error_message else msg
        prop.invalid = True
    if loose:
        text = "\n".join(p.render() for p in loose)
        inputs.view(
            "nola_problems",
            types.Error(label="Cannot run with these inputs", description=text),
            invalid=True,
            error_message=text,
        )
    if report.warnings:
        inputs.view(
            "nola_warnings",
            types.Warning(label="Check before running", description="\n".join(p.render() for p in report.warnings)),
        )
    return report


def summary_output(ctx, title: str):
    outputs = types.Object()
    outputs.str("summary", label=title, view=types.MarkdownView())
    return types.Property(outputs)


def markdown_summary(title: str, summary: dict, lines: list | None = None) -> str:
    body = "\n".join(f"- **{k}**: {v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
    tail = ("\n\n```\n" + "\n".join(lines[-30:]) + "\n```") if lines else ""
    return f"### {title}\n{body}{tail}"


# ---------------------------------------------------------------------------- review forms

NONE_CHOICE = "(none)"


def class_choices(ctx, field: str = "nola") -> list:
    """The dataset's class list (``default_classes``, else the labels in ``field``)."""
    from fiftyone_nola.stages.review import class_list

    return class_list(ctx.dataset, field) if ctx.dataset is not None else []


def add_class_choice(
    ctx, inputs, name: str, label: str, field: str = "nola", required: bool = True, description: str | None = None
) -> list:
    """A dropdown of the dataset's classes: nothing outside the list can be chosen."""
    classes = class_choices(ctx, field)
    if not classes:
        inputs.str(
            name,
            required=required,
            label=label,
            description="the dataset has no class list yet: run the pipeline first",
        )
        return classes
    view = (
        types.DropdownView()
        if len(classes) <= 30
        else types.AutocompleteView(choices=[types.Choice(c, label=c) for c in classes], allow_user_input=False)
    )
    inputs.enum(name, classes, required=required, label=label, description=description, view=view)
    return classes


def add_gt_choice(ctx, inputs, name: str, label: str, exclude=()) -> None:
    """An optional ground-truth dropdown that defaults to none. Fields written by NoLA stages
    (predictions, not ground truth) and ``exclude`` are not offered."""
    from fiftyone_nola.core.names import STAGE_FIELDS, SUGGESTED_FIELD

    skip = set(exclude) | set(STAGE_FIELDS) | {SUGGESTED_FIELD}
    fields = [f for f in label_fields(ctx) if f not in skip]
    inputs.enum(
        name,
        [NONE_CHOICE, *fields],
        default=NONE_CHOICE,
        required=False,
        label=label,
        description="none: no calibration (a dataset without ground truth has none)",
        view=types.DropdownView(),
    )


def choice_param(ctx, name: str):
    v = ctx.params.get(name)
    return None if v in (None, "", NONE_CHOICE) else v


def reload_app(ctx, reload: Optional[str]) -> None:
    """``"dataset"``: the App re-reads the dataset (new fields); ``"samples"``: the grid and its
    counts; None: nothing."""
    if reload == "dataset":
        ctx.ops.reload_dataset()
    elif reload == "samples":
        ctx.ops.reload_samples()


def show_review_fields(ctx, extra=(), reload: Optional[str] = "dataset") -> None:
    """After an action: make the tags and review fields visible in the grid, re-read by the App.

    ``reload``: ``"dataset"`` after a write that may add fields (the App re-reads the schema),
    ``"samples"`` after one that changed only values (the grid and its counts), None when nothing
    was written. Each reload and each change of the active fields is one more round trip of the
    App (a grid reload at 100,000 samples), so the fields are set only when one is not active."""
    from fiftyone_nola.core.names import CORRECTIONS_FIELD, PREDICTIONS_FIELD, SUGGESTED_FIELD

    ds = ctx.dataset
    fields = ["tags", PREDICTIONS_FIELD, *extra]
    fields += [f for f in (CORRECTIONS_FIELD, SUGGESTED_FIELD) if ds is not None and ds.has_sample_field(f)]
    reload_app(ctx, reload)
    wanted = [f for f in dict.fromkeys(fields) if f == "tags" or (ds is not None and ds.has_sample_field(f))]
    active = set(ctx.active_fields or [])
    if not active or not set(wanted) <= active:
        ctx.ops.set_active_fields(fields=wanted)


def r3(x):
    """Numbers as a person reads them: 3 decimals, None stays None."""
    return None if x is None else round(float(x), 3)
