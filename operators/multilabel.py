"""Operators of the CDUL multi-label path: pseudo-labels, classifier, evaluation."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.cdul import TrainConfig
from fiftyone_nola.core.config import bounds
from fiftyone_nola.stages.cdul import (
    MultiLabelConfig,
    evaluate_multilabel_stages,
    multilabel_pseudo_labels,
    train_multilabel,
)
from fiftyone_nola.stages.validation import check_params

from . import _common as c


def _config(ctx) -> MultiLabelConfig:
    p = ctx.params
    return c.given(
        MultiLabelConfig,
        clip=c.clip_spec(ctx),
        descriptions_file=c.text(ctx, "descriptions_file"),
        crop=c.given_in(MultiLabelConfig, "crop", grid=p.get("grid")),
        threshold_t=p.get("threshold_t"),
        aggregation=c.text(ctx, "aggregation"),
        train=c.given_in(MultiLabelConfig, "train", epochs=p.get("epochs")),
        allow_template_fallback=p.get("allow_template_fallback"),
        device=c.device_param(ctx),
        pseudo_field=c.text(ctx, "pseudo_field"),
        pred_field=c.text(ctx, "pred_field"),
        gt_field=c.text(ctx, "gt_field"),
    )


def _default(name: str):
    return c.field_default(MultiLabelConfig, name)


def _common_inputs(ctx, inputs):
    c.target_samples(ctx)
    c.add_clip_inputs(inputs)
    c.add_random_init_input(inputs)
    inputs.str("pseudo_field", default=_default("pseudo_field"), label="Pseudo-label field")
    inputs.str("pred_field", default=_default("pred_field"), label="Classifier output field")
    c.add_device_input(inputs)


class MultiLabelPseudoLabels(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="multilabel_pseudo_labels",
            label="CDUL: multi-label pseudo-labels",
            description="Global + local (grid crop) CLIP scores aggregated into soft multi-label vectors",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.add_classes_input(ctx, inputs)
        inputs.str("descriptions_file", required=False, label="Descriptions JSON (optional)")
        inputs.bool(
            "allow_template_fallback",
            default=_default("allow_template_fallback"),
            label="CLIP templates for classes the file lacks",
        )
        inputs.int("grid", default=_default("crop").grid, label="Crop grid (n x n)")
        inputs.float("threshold_t", default=_default("threshold_t"), label="Aggregation threshold t")
        inputs.enum("aggregation", ["avg", "lambda", "global"], default=_default("aggregation"), label="Aggregation")
        _common_inputs(ctx, inputs)
        p = ctx.params
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                **c.text_inputs_check(ctx),
                outputs={"pseudo_field": c.text(ctx, "pseudo_field", _default("pseudo_field"))},
                output_type="Classifications",
                ranges={"grid": (p.get("grid"), 1, 16, True), "threshold_t": (p.get("threshold_t"), 0.0, 1.0, False)},
            ),
        )
        return types.Property(inputs, view=types.View(label="Multi-label pseudo-labels"))

    def execute(self, ctx):
        lines: list = []
        with c.collected_log(lines):
            s = multilabel_pseudo_labels(
                c.target_samples(ctx), c.classes_param(ctx), _config(ctx), progress=c.progress_fn(ctx)
            )
        return {"summary": c.markdown_summary("Multi-label pseudo-labels", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Multi-label pseudo-labels")


class TrainMultiLabel(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="train_multilabel",
            label="CDUL: train multi-label classifier",
            description="Classifier on stored features with gradient-aligned pseudo-label updates",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.int("epochs", required=False, label="Epochs (blank: fit hardware; 100 on a GPU as the paper)")
        _common_inputs(ctx, inputs)
        p = ctx.params
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                clip=c.clip_spec(ctx),
                device=c.device_param(ctx),
                stages={
                    "pseudo_field": (c.text(ctx, "pseudo_field", _default("pseudo_field")), "multi-label pseudo-label")
                },
                outputs={"pred_field": c.text(ctx, "pred_field", _default("pred_field"))},
                output_type="Classifications",
                ranges={"epochs": (p.get("epochs"), *bounds(TrainConfig, "epochs").range)},
            ),
        )
        return types.Property(inputs, view=types.View(label="Train multi-label classifier"))

    def execute(self, ctx):
        lines: list = []
        with c.collected_log(lines):
            s = train_multilabel(c.target_samples(ctx), _config(ctx), progress=c.progress_fn(ctx))
        return {"summary": c.markdown_summary("Multi-label classifier", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Multi-label classifier")


class EvaluateMultiLabel(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="evaluate_multilabel",
            label="CDUL: evaluate (mAP)",
            description="mAP and per-class AP of each multi-label stage against a ground-truth field",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.add_field_choice(
            ctx,
            inputs,
            "gt_field",
            "Ground-truth field",
            types_=("Classifications", "Detections"),
            default="ground_truth",
        )
        _common_inputs(ctx, inputs)
        p = ctx.params
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                gt_field=p.get("gt_field"),
                gt_multilabel=True,
                fields={"gt_field": (p.get("gt_field"), ("Classification", "Classifications", "Detections"))},
                stages={
                    "pseudo_field": (c.text(ctx, "pseudo_field", _default("pseudo_field")), "multi-label pseudo-label")
                },
            ),
        )
        return types.Property(inputs, view=types.View(label="Evaluate multi-label"))

    def execute(self, ctx):
        ev = evaluate_multilabel_stages(c.target_samples(ctx), _config(ctx))
        table = "\n".join(f"| {k} | {v['mAP']:.4f} | {v['classes_evaluated']} |" for k, v in ev.items())
        md = "### mAP\n| stage | mAP | classes |\n|---|---|---|\n" + table
        return {"summary": md, "result": c.jsonable({k: v["mAP"] for k, v in ev.items()})}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Multi-label evaluation")
