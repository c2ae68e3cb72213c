"""Operator: transductive labels from the stored vectors (TransCLIP / StatA / ZLaP), no training."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.transductive import FEATURE_SPACES, METHODS, TransductiveConfig
from fiftyone_nola.stages.transductive import transductive_labels
from fiftyone_nola.stages.validation import check_params

from . import _common as c


def transductive_config(ctx) -> TransductiveConfig:
    """The form's (or the call's) settings: only what was given; the rest the library's defaults."""
    p = ctx.params
    return c.given(TransductiveConfig, method=p.get("method"), safeguard=p.get("safeguard"), features=p.get("features"))


class TransductiveLabels(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "transductive_labels",
            "NoLA: transductive labels (no training)",
            "Label every sample from the stored vectors and the zero-shot text prior in seconds "
            "(TransCLIP with its StatA safeguard, or ZLaP); can refine another field's predictions",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.enum("method", list(METHODS), default=c.field_default(TransductiveConfig, "method"), label="Method")
        inputs.bool(
            "safeguard",
            default=c.field_default(TransductiveConfig, "safeguard"),
            label="Safeguard for datasets holding only some of the classes",
        )
        inputs.enum(
            "features",
            list(FEATURE_SPACES),
            default=c.field_default(TransductiveConfig, "features"),
            label="Feature space (the text prior is CLIP's either way)",
        )
        c.add_field_choice(
            ctx, inputs, "init_field", "Refine the predictions of (optional)", default=None, required=False
        )
        inputs.str("label_field", default=c.arg_default(transductive_labels, "label_field"), label="Output field")
        init = c.choice_param(ctx, "init_field")
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                stages={"zeroshot_field": (c.arg_default(transductive_labels, "zeroshot_field"), "zero-shot")},
                fields={"init_field": (init, ("Classification",))} if init else None,
                outputs={"label_field": c.arg_param(ctx, "label_field", transductive_labels)},
            ),
        )
        return types.Property(inputs, view=types.View(label="Transductive labels"))

    def execute(self, ctx):
        lines: list = []
        with c.collected_log(lines):
            s = transductive_labels(
                c.target_samples(ctx),
                config=transductive_config(ctx),
                init_field=c.choice_param(ctx, "init_field"),
                label_field=c.arg_param(ctx, "label_field", transductive_labels),
                progress=c.progress_fn(ctx),
            )
        c.show_review_fields(ctx, extra=(s["field"],))
        return {"summary": c.markdown_summary("Transductive labels", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Transductive labels")
