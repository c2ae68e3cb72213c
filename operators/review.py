"""Operators of the review step: flag doubtful samples, mark accepted/rejected/corrected,
feed corrections back into training, and export what was accepted."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola import review
from fiftyone_nola.export import FORMATS, export_accepted
from fiftyone_nola.validation import check_params

from . import _common as c


def _missing_label():
    from fiftyone_nola.validation import Problem, Report

    return Report([Problem("label", "a corrected label is required for action=correct", "type the right class")])


def _confidence_plot_data(samples, field: str) -> list:
    """Plotly box traces: confidence distribution per predicted class."""
    labels, conf = samples.values([f"{field}.label", f"{field}.confidence"])
    traces = []
    for lab in sorted({x for x in labels if x is not None}):
        ys = [float(cf) for x, cf in zip(labels, conf) if x == lab and cf is not None]
        traces.append({"type": "box", "name": lab, "y": ys, "boxpoints": False})
    return traces


def _calibration_plot_data(curve: dict) -> list:
    xs = [x for x, n in zip(curve["mean_confidence"], curve["count"]) if n]
    ys = [y for y, n in zip(curve["accuracy"], curve["count"]) if n]
    return [{"type": "scatter", "mode": "lines+markers", "name": "model", "x": xs, "y": ys},
            {"type": "scatter", "mode": "lines", "name": "perfectly calibrated", "x": [0, 1], "y": [0, 1],
             "line": {"dash": "dash"}}]


class ReviewLowConfidence(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="review_low_confidence", label="NoLA: flag samples for review",
            description="Tag low-confidence / bottom-k per class samples, save review views, show per-class table and plots",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        c.add_field_choice(ctx, inputs, "field", "Predictions to review", default="nola")
        inputs.float("threshold", default=0.5, label="Confidence threshold",
                     view=types.SliderView(componentsProps={"slider": {"min": 0, "max": 1, "step": 0.01}}))
        inputs.int("bottom_k", default=0, label="Also flag the k least confident per class (0: off)")
        c.add_field_choice(ctx, inputs, "gt_field", "Ground truth for calibration (optional)",
                           default=None, required=False)
        p = ctx.params
        c.check_form(ctx, inputs, lambda: check_params(
            c.target_samples(ctx), need_samples=False,
            fields={"field": (p.get("field") or "nola", ("Classification",)),
                    **({"gt_field": (p["gt_field"], ("Classification",))} if p.get("gt_field") else {})},
            ranges={"threshold": (p.get("threshold"), 0.0, None, False), "bottom_k": (p.get("bottom_k"), 0, None, True)}))
        return types.Property(inputs, view=types.View(label="Review"))

    def execute(self, ctx):
        p = ctx.params
        samples = c.target_samples(ctx)
        field = p.get("field") or "nola"
        s = review.flag_for_review(samples, field, threshold=p.get("threshold"),
                                   bottom_k_per_class=p.get("bottom_k") or None)
        views = review.save_review_views(ctx.dataset, field, threshold=c.param(ctx, "threshold", 0.5))
        table = review.class_table(samples, field, p.get("gt_field") or None)
        rows = "\n".join(f"| {r['class']} | {r['count']} | {r['mean_confidence']:.3f} | {r['flagged']} | {r['accepted']} |"
                         for r in table)
        md = (f"### Review: {s['flagged']} of {s['samples']} samples tagged `{review.REVIEW_TAG}`\n"
              f"Saved views: {', '.join(views)}\n\n| class | count | mean conf. | flagged | accepted |\n"
              f"|---|---|---|---|---|\n{rows}")
        out = {"summary": md, "confidence_plot": _confidence_plot_data(samples, field),
               "result": c.jsonable({**s, "views": views, "table": table})}
        if p.get("gt_field"):
            curve = review.calibration(samples, field, p["gt_field"])
            out["calibration_plot"] = _calibration_plot_data(curve)
            out["result"]["ece"] = curve["ece"]
        ctx.trigger("reload_dataset")
        return out

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("summary", view=types.MarkdownView())
        outputs.list("confidence_plot", types.Object(), label="Confidence per class",
                     view=types.PlotlyView(layout={"title": "Confidence per predicted class", "height": 400}))
        if ctx.params.get("gt_field"):
            outputs.list("calibration_plot", types.Object(), label="Reliability curve",
                         view=types.PlotlyView(layout={"title": "Reliability (accuracy vs confidence)",
                                                       "xaxis": {"title": "confidence"},
                                                       "yaxis": {"title": "accuracy"}, "height": 400}))
        return types.Property(outputs)


class MarkReviewed(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="mark_reviewed", label="NoLA: accept / reject / correct",
            description="Mark the selected samples (or view) accepted or rejected, or store a corrected label",
            dynamic=True, allow_immediate_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.enum("action", ["accept", "reject", "correct", "accept_above"], default="accept",
                    label="Action", view=types.RadioGroup())
        inputs.str("label", required=False, label="Corrected label (action=correct)")
        inputs.str("field", default="nola", label="Predictions field (action=accept_above)")
        inputs.float("threshold", default=0.9, label="Accept if confidence >= (action=accept_above)")
        p = ctx.params
        action = p.get("action", "accept")
        c.check_form(ctx, inputs, lambda: check_params(
            c.target_samples(ctx), need_samples=False,
            fields={"field": (p.get("field") or "nola", ("Classification",))} if action == "accept_above" else None,
            ranges={"threshold": (p.get("threshold"), 0.0, 1.0, False)},
            files=None) if action != "correct" or p.get("label") else _missing_label())
        return types.Property(inputs, view=types.View(label="Mark reviewed"))

    def execute(self, ctx):
        p = ctx.params
        samples = c.target_samples(ctx)
        action = p.get("action", "accept")
        if action == "accept":
            n = review.set_status(samples, "accepted")
        elif action == "reject":
            n = review.set_status(samples, "rejected")
        elif action == "correct":
            n = review.correct_label(samples, p["label"], ctx.dataset.default_classes or None)
        else:
            n = review.accept_above(samples, p.get("field") or "nola", c.param(ctx, "threshold", 0.9))
        ctx.trigger("reload_dataset")
        return {"summary": f"{action}: {n} samples", "result": {"action": action, "samples": n}}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Review")


class RetrainWithCorrections(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="retrain_with_corrections", label="NoLA: retrain with corrections",
            description="Re-run the DINO labeller and prompt tuning with reviewed labels as trusted supervision",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.str("corrections_field", default=review.CORRECTIONS_FIELD, label="Corrections field")
        inputs.bool("tune", default=True, label="Also re-run prompt tuning")
        c.add_clip_inputs(inputs)
        c.add_dino_inputs(inputs)
        c.add_random_init_input(inputs)
        c.add_device_input(inputs)
        p = ctx.params
        c.check_form(ctx, inputs, lambda: check_params(
            c.target_samples(ctx), clip=c.clip_spec(ctx) if p.get("tune", True) else None, dino=c.dino_spec(ctx),
            device=c.device_param(ctx), stages={"corrections_field": ("nola_zeroshot", "zero-shot")},
            fields={"corrections_field": (p.get("corrections_field") or review.CORRECTIONS_FIELD,
                                          ("Classification",))}))
        return types.Property(inputs, view=types.View(label="Retrain with corrections"))

    def execute(self, ctx):
        from fiftyone_nola.corrections import retrain_with_corrections

        p = ctx.params
        lines: list = []
        s = retrain_with_corrections(c.target_samples(ctx), p.get("corrections_field") or review.CORRECTIONS_FIELD,
                                     clip=c.clip_spec(ctx), dino=c.dino_spec(ctx), tune=bool(p.get("tune", True)),
                                     device=c.device_param(ctx), progress=c.progress_fn(ctx), log=c.log_fn(lines))
        return {"summary": c.markdown_summary("Retrained with corrections", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Retrain")


class ExportAccepted(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="export_accepted", label="NoLA: export accepted",
            description="Export accepted (or above-threshold) samples with their final labels",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        c.add_field_choice(ctx, inputs, "label_field", "Labels to export", types_=("Classification", "Classifications"),
                           default="nola")
        inputs.str("export_dir", required=True, label="Export directory")
        inputs.enum("format", list(FORMATS), default="classification-tree", label="Format")
        inputs.float("min_confidence", required=False, label="Also export unreviewed samples with confidence >=")
        inputs.bool("overwrite", default=False, label="Overwrite a non-empty directory")
        p = ctx.params
        c.check_form(ctx, inputs, lambda: check_params(
            c.target_samples(ctx),
            fields={"label_field": (p.get("label_field") or "nola", ("Classification", "Classifications"))},
            ranges={"min_confidence": (p.get("min_confidence"), 0.0, 1.0, False)},
            writable={"export_dir": (p.get("export_dir"), "export directory", False)}))
        return types.Property(inputs, view=types.View(label="Export accepted"))

    def execute(self, ctx):
        p = ctx.params
        r = export_accepted(c.target_samples(ctx), p["export_dir"], p.get("label_field") or "nola",
                            p.get("format") or "classification-tree", p.get("min_confidence"),
                            overwrite=bool(p.get("overwrite")))
        left = ", ".join(f"{k}: {v}" for k, v in r["left_out"].items() if v)
        return {"summary": f"### Exported {r['exported']} samples to `{r['export_dir']}`\nLeft out: {left or 'none'}",
                "result": c.jsonable(r)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Export")
