"""Operators of the review step: flag doubtful samples, mark accepted/rejected/corrected,
feed corrections back into training, and export what was accepted."""

from __future__ import annotations

import logging

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.core.names import DEFAULT_THRESHOLD, PREDICTIONS_FIELD, REVIEW_TAG
from fiftyone_nola.stages import review
from fiftyone_nola.stages.corrections import CorrectionsConfig, retrain_with_corrections
from fiftyone_nola.stages.evaluation import calibration
from fiftyone_nola.stages.export import CERTIFIED, FORMATS, export_accepted
from fiftyone_nola.stages.review import flag_samples, propagate_corrections, summary
from fiftyone_nola.stages.validation import check_params

from . import _common as c

logger = logging.getLogger(__name__)
PLOT_SAMPLES = 20_000  # the per-class confidence boxes are drawn from at most this many samples


def _missing_label():
    from fiftyone_nola.stages.validation import Problem, Report

    return Report([Problem("label", "a corrected label is required for action=correct", "pick the right class")])


def _confidence_plot_data(samples, field: str) -> list:
    """Plotly box traces: confidence distribution per predicted class (of a random sample of
    :data:`PLOT_SAMPLES` on large datasets: a browser draws no million-point box)."""
    if samples.count() > PLOT_SAMPLES:
        samples = samples.take(PLOT_SAMPLES, seed=0)
    labels, conf = samples.values([f"{field}.label", f"{field}.confidence"])
    traces = []
    for lab in sorted({x for x in labels if x is not None}):
        ys = [float(cf) for x, cf in zip(labels, conf) if x == lab and cf is not None]
        traces.append({"type": "box", "name": lab, "y": ys, "boxpoints": False})
    return traces


def _calibration_plot_data(curve: dict) -> list:
    xs = [x for x, n in zip(curve["mean_confidence"], curve["count"]) if n]
    ys = [y for y, n in zip(curve["accuracy"], curve["count"]) if n]
    return [
        {"type": "scatter", "mode": "lines+markers", "name": "model", "x": xs, "y": ys},
        {
            "type": "scatter",
            "mode": "lines",
            "name": "perfectly calibrated",
            "x": [0, 1],
            "y": [0, 1],
            "line": {"dash": "dash"},
        },
    ]


# The forms' defaults are the library functions' own.
FIELD = PREDICTIONS_FIELD
THRESHOLD = DEFAULT_THRESHOLD
FORMAT = c.arg_default(export_accepted, "format")
MIN_SIMILARITY = c.arg_default(propagate_corrections, "min_similarity")
NEIGHBOURS = c.arg_default(propagate_corrections, "k")
ACCEPT_ABOVE = 0.9  # the form's suggestion for accept_above, which has no library default


def _bottom_k(ctx):
    """The form's 0 ("off") is the library's None."""
    k = c.param(ctx, "bottom_k", 0)
    return k if k > 0 else None


class ReviewLowConfidence(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "review_low_confidence",
            "NoLA: flag samples for review",
            "Flag low-confidence / bottom-k per class samples, queue them, save review "
            "views, show the per-class table and plots",
            delegated=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        c.add_field_choice(ctx, inputs, "field", "Predictions to review", default=FIELD)
        p = ctx.params
        field = c.text(ctx, "field", FIELD)
        inputs.float(
            "threshold",
            default=THRESHOLD,
            label="Flag samples below this confidence",
            view=types.SliderView(componentsProps={"slider": {"min": 0, "max": 1, "step": 0.01}}),
        )
        inputs.int("bottom_k", default=0, label="Also flag the k least confident per class (0: off)")
        _preview_notice(ctx, inputs, field)
        c.add_gt_choice(ctx, inputs, "gt_field", "Ground truth for calibration (optional)", exclude=(field,))
        gt = c.choice_param(ctx, "gt_field")
        c.check_form(
            ctx,
            inputs,
            lambda: (
                _same_field(gt, field)
                or check_params(
                    c.target_samples(ctx),
                    need_samples=False,
                    fields={
                        "field": (field, ("Classification",)),
                        **({"gt_field": (gt, ("Classification",))} if gt else {}),
                    },
                    ranges={
                        "threshold": (p.get("threshold"), 0.0, None, False),
                        "bottom_k": (p.get("bottom_k"), 0, None, True),
                    },
                )
            ),
        )
        return types.Property(inputs, view=types.View(label="Review"))

    def execute(self, ctx):
        samples = c.target_samples(ctx)
        field = c.text(ctx, "field", FIELD)
        threshold = c.param(ctx, "threshold", THRESHOLD)
        bottom_k = _bottom_k(ctx)
        s = flag_samples(samples, field, threshold=threshold, bottom_k=bottom_k)
        table = s["classes"]
        rows = "\n".join(
            f"| {r['class']} | {r['count']} | {_fmt(r['mean_confidence'])} | {r['flagged']} | "
            f"{r['reviewed']} | {r['remaining']} |"
            for r in table
        )
        md = (
            f"### Review: {s['flagged']} of {s['samples']} samples flagged (`nola:flagged`), "
            f"{s['queue']} in the queue (`{REVIEW_TAG}`)\n"
            f"Saved views: {', '.join(s['views'])}\n\n"
            "| class | count | mean conf. | flagged | reviewed | remaining |\n"
            f"|---|---|---|---|---|---|\n{rows}"
        )
        result = {k: v for k, v in s.items() if k not in ("classes", "histogram")}
        out = {
            "confidence_plot": _confidence_plot_data(samples, field),
            "result": c.jsonable({**result, "table": table}),
        }
        gt = c.choice_param(ctx, "gt_field")
        if gt and gt != field:
            curve = calibration(samples, field, gt)
            out["calibration_plot"] = _calibration_plot_data(curve)
            out["result"]["ece"] = c.r3(curve["ece"])
            md += (
                f"\n\n**Calibration vs `{gt}`**: expected calibration error (ECE) **{c.r3(curve['ece'])}** "
                f"over {sum(curve['count'])} samples (0 = confidences match accuracy)"
            )
        else:
            md += "\n\nNo ground truth chosen: no calibration (it needs labels other than the predictions)."
        out["summary"] = md
        c.show_review_fields(ctx)
        return out

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("summary", view=types.MarkdownView())
        outputs.list(
            "confidence_plot",
            types.Object(),
            label="Confidence per class",
            view=types.PlotlyView(layout={"title": "Confidence per predicted class", "height": 400}),
        )
        if c.choice_param(ctx, "gt_field"):
            outputs.list(
                "calibration_plot",
                types.Object(),
                label="Reliability curve",
                view=types.PlotlyView(
                    layout={
                        "title": "Reliability (accuracy vs confidence)",
                        "xaxis": {"title": "confidence"},
                        "yaxis": {"title": "accuracy"},
                        "height": 400,
                    }
                ),
            )
        return types.Property(outputs)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _same_field(gt, field):
    """Calibrating predictions against themselves is meaningless: refuse it in the form."""
    from fiftyone_nola.stages.validation import Problem, Report

    if gt and gt == field:
        return Report(
            [Problem("gt_field", f"'{gt}' is the predictions field itself", "choose a ground-truth field, or none")]
        )
    return None


def _preview_notice(ctx, inputs, field) -> None:
    """Live count of what the threshold would flag, shown above the Execute button."""
    if ctx.dataset is None:
        return
    try:
        pv = summary(c.target_samples(ctx), field, c.param(ctx, "threshold", THRESHOLD))
    except (ValueError, KeyError) as e:  # a field the form has not checked yet: no preview
        logger.debug("no flagging preview: %r", e)
        return
    inputs.view(
        "preview",
        types.Notice(
            label=f"{pv['would_flag']} of {pv['samples']} samples would be flagged below the threshold; "
            f"{pv['would_flag_reviewed']} of them already reviewed"
        ),
    )


class MarkReviewed(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="mark_reviewed",
            label="NoLA: accept / reject / correct",
            description="Mark the selected samples (or view) accepted or rejected, or store a corrected label",
            dynamic=True,
            allow_immediate_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.enum(
            "action",
            ["accept", "reject", "correct", "accept_above"],
            default="accept",
            label="Action",
            view=types.RadioGroup(),
        )
        p = ctx.params
        action = p.get("action", "accept")
        classes = []
        if action == "correct":
            classes = c.add_class_choice(ctx, inputs, "label", "Right class (from the dataset's class list)")
        if action == "accept_above":
            c.add_field_choice(ctx, inputs, "field", "Predictions field", default=FIELD)
            inputs.float("threshold", default=ACCEPT_ABOVE, label="Accept if confidence >=")
        c.check_form(
            ctx,
            inputs,
            lambda: (
                _label_problem(p.get("label"), classes)
                if action == "correct"
                else check_params(
                    c.target_samples(ctx),
                    need_samples=False,
                    fields={"field": (c.text(ctx, "field", FIELD), ("Classification",))}
                    if action == "accept_above"
                    else None,
                    ranges={"threshold": (p.get("threshold"), 0.0, 1.0, False)},
                    files=None,
                )
            ),
        )
        return types.Property(inputs, view=types.View(label="Mark reviewed"))

    def execute(self, ctx):
        p = ctx.params
        samples = c.target_samples(ctx)
        action = p.get("action", "accept")
        if action in ("accept", "reject", "correct"):
            n = review.decide(samples, samples.values("id"), action, p.get("label") if action == "correct" else None)[
                "samples"
            ]
        else:
            n = review.accept_above(samples, c.text(ctx, "field", FIELD), c.param(ctx, "threshold", ACCEPT_ABOVE))
        ctx.ops.clear_selected_samples()
        c.show_review_fields(ctx)
        return {"summary": f"{action}: {n} samples", "result": {"action": action, "samples": n}}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Review")


def _label_problem(label, classes):
    from fiftyone_nola.stages.validation import Problem, Report

    if not label:
        return _missing_label()
    if classes and label not in classes:
        return Report([Problem("label", f"{label!r} is not one of the dataset's classes", "pick one from the list")])
    return Report([])


def corrections_config(ctx) -> CorrectionsConfig:
    """The retraining config of the form's (or the call's) params: only what was given."""
    tune = ctx.params.get("tune")
    return c.given(
        CorrectionsConfig,
        corrections_field=c.text(ctx, "corrections_field"),
        clip=c.clip_spec(ctx),
        dino=c.dino_spec(ctx),
        skip_tuning=None if tune is None else not tune,
        device=c.device_param(ctx),
    )


class RetrainWithCorrections(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="retrain_with_corrections",
            label="NoLA: retrain with corrections",
            description="Re-run the DINO labeller and prompt tuning with reviewed labels as trusted supervision",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.str(
            "corrections_field",
            default=c.field_default(CorrectionsConfig, "corrections_field"),
            label="Corrections field",
        )
        inputs.bool(
            "tune", default=not c.field_default(CorrectionsConfig, "skip_tuning"), label="Also re-run prompt tuning"
        )
        c.add_clip_inputs(inputs)
        c.add_dino_inputs(inputs)
        c.add_random_init_input(inputs)
        c.add_device_input(inputs)
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                clip=None if corrections_config(ctx).skip_tuning else c.clip_spec(ctx),
                dino=c.dino_spec(ctx),
                device=c.device_param(ctx),
                stages={"corrections_field": (corrections_config(ctx).zeroshot_field, "zero-shot")},
                fields={"corrections_field": (corrections_config(ctx).corrections_field, ("Classification",))},
            ),
        )
        return types.Property(inputs, view=types.View(label="Retrain with corrections"))

    def execute(self, ctx):
        lines: list = []
        with c.collected_log(lines):
            s = retrain_with_corrections(c.target_samples(ctx), corrections_config(ctx), progress=c.progress_fn(ctx))
        return {"summary": c.markdown_summary("Retrained with corrections", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Retrain")


class ExportAccepted(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="export_accepted",
            label="NoLA: export accepted",
            description="Export accepted (or above-threshold) samples with their final labels",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        from fiftyone_nola.stages.export import nothing_to_export_message, plan_export, suggest_export_dir

        inputs = types.Object()
        inputs.view_target(ctx, action_description="Export", default_target="DATASET")
        c.add_field_choice(
            ctx, inputs, "label_field", "Labels to export", types_=("Classification", "Classifications"), default=FIELD
        )
        p = ctx.params
        field = c.text(ctx, "label_field", FIELD)
        suggested = suggest_export_dir(ctx.dataset, field) if ctx.dataset is not None else None
        inputs.str(
            "export_dir",
            required=True,
            default=suggested,
            label="Export directory",
            description=f"on the machine running FiftyOne; suggested: {suggested}",
        )
        inputs.enum("format", list(FORMATS), default=FORMAT, label="Format", view=types.DropdownView())
        include = types.RadioGroup()
        for value, label in INCLUDE.items():
            include.add_choice(value, label=label)
        inputs.enum("include", include.values(), default=_include(p), label="What to export", view=include)
        if _include(p) == "confident":
            inputs.float("min_confidence", required=True, label="Unreviewed samples with confidence >=")
        inputs.bool("overwrite", default=False, label="Overwrite a non-empty directory")

        def check():
            from fiftyone_nola.stages.validation import Problem

            report = check_params(
                _export_target(ctx),
                fields={"label_field": (field, ("Classification", "Classifications"))},
                ranges={"min_confidence": (p.get("min_confidence"), 0.0, 1.0, False)},
                writable={"export_dir": (c.text(ctx, "export_dir", suggested), "export directory", False)},
            )
            if not report.errors:
                try:
                    plan = plan_export(_export_target(ctx), field, _min_confidence(p))
                except NolaError as e:  # e.g. a certified export without an audit
                    report.problems.append(Problem("include", str(e)))
                    return report
                if not plan.count:
                    report.problems.append(Problem("", nothing_to_export_message(plan.left_out, plan.report)))
                else:
                    cert = f" ({plan.report['certificate']})" if plan.report is not None else ""
                    inputs.view("plan", types.Notice(label=f"{plan.count} samples will be exported{cert}"))
            return report

        c.check_form(ctx, inputs, check)
        return types.Property(inputs, view=types.View(label="Export accepted"))

    def execute(self, ctx):
        from fiftyone_nola.stages.export import suggest_export_dir

        p = ctx.params
        samples = _export_target(ctx)
        field = c.text(ctx, "label_field", FIELD)
        try:
            r = export_accepted(
                samples,
                c.text(ctx, "export_dir") or suggest_export_dir(samples, field),
                field,
                c.text(ctx, "format", FORMAT),
                _min_confidence(p),
                overwrite=c.param(ctx, "overwrite", False),
            )
        except NolaError as e:  # a message, never a traceback
            return {"summary": f"### Nothing exported\n{e}", "result": {"exported": 0, "error": str(e)}}
        left = ", ".join(f"{k}: {v}" for k, v in r["left_out"].items() if v)
        return {
            "summary": f"### Exported {r['exported']} samples to `{r['export_dir']}`\nLeft out: {left or 'none'}",
            "result": c.jsonable(r),
        }

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Export")


INCLUDE = {
    "reviewed": "Reviewed samples (accepted or corrected)",
    "confident": "Reviewed + unreviewed above a confidence",
    "certified": "Reviewed + what the audit certifies (with certificate.json)",
}


def _include(p: dict) -> str:
    """The form's choice; an older call giving only ``min_confidence`` meant 'confident'."""
    default = "confident" if p.get("min_confidence") is not None else "reviewed"
    return p.get("include") if p.get("include") in INCLUDE else default


def _min_confidence(p: dict):
    """``export_accepted``'s ``min_confidence`` for the form's choice."""
    return {"reviewed": None, "confident": p.get("min_confidence"), "certified": CERTIFIED}[_include(p)]


def _export_target(ctx):
    """The whole dataset unless the form's target says otherwise (a leftover selection never
    narrows an export by itself)."""
    if ctx.params.get("view_target") or ctx.request_params.get("view_target"):
        return ctx.target_view()
    return ctx.dataset


def _propagation(ctx) -> tuple:
    """(field, min_similarity, k) of the params given, else the library's defaults."""
    return (c.text(ctx, "field", FIELD), c.param(ctx, "min_similarity", MIN_SIMILARITY), c.param(ctx, "k", NEIGHBOURS))


class PropagateCorrections(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "propagate_corrections",
            "NoLA: suggest corrections to similar samples",
            "Offer each reviewer correction to its nearest undecided neighbours carrying "
            "the same wrong label, as suggestions tagged for review (never as reviewed "
            "labels)",
            delegated=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.add_field_choice(ctx, inputs, "field", "Predictions field", default=FIELD)
        inputs.float(
            "min_similarity", default=MIN_SIMILARITY, min=0.0, max=1.0, label="Neighbour similarity >= (cosine)"
        )
        inputs.int("k", default=NEIGHBOURS, min=1, label="Neighbours looked at per correction")
        if ctx.dataset is not None:
            try:
                r = propagate_corrections(ctx.dataset, *_propagation(ctx), apply=False)
                inputs.view(
                    "preview",
                    types.Notice(
                        label=f"{r['corrections']} corrections would suggest labels for {r['suggested']} neighbours"
                    ),
                )
            except Exception as e:  # a preview is a courtesy: the form still runs; execute reports errors
                logger.debug("propagation preview failed: %s", e)
        return types.Property(inputs, view=types.View(label="Propagate corrections"))

    def execute(self, ctx):
        r = propagate_corrections(ctx.dataset, *_propagation(ctx), progress=c.progress_fn(ctx))
        c.show_review_fields(ctx)
        by = ", ".join(f"{k}: {v}" for k, v in r["by_label"].items()) or "none"
        return {
            "summary": f"### {r['suggested']} neighbours got a suggestion from {r['corrections']} corrections\n"
            f"By label: {by}. They are tagged `nola:suggested` and back in the review queue.",
            "result": c.jsonable({k: v for k, v in r.items() if k != "ids"} | {"ids": r["ids"][:1000]}),
        }

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Propagate corrections")
