"""Operator: the whole single-label pipeline with defaults."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.core.transductive import METHODS as TRANSDUCTIVE_METHODS
from fiftyone_nola.core.transductive import TransductiveConfig
from fiftyone_nola.pipeline import AutoLabelConfig, auto_label, summary_lines
from fiftyone_nola.stages.nola import ZeroShotConfig
from fiftyone_nola.stages.validation import Target, check_auto_label

from . import _common as c

REFINE_OFF = "off"


def config(ctx) -> AutoLabelConfig:
    """The pipeline config of the form's (or the call's) params: only what was given."""
    p = ctx.params
    zeroshot = c.given(
        ZeroShotConfig,
        descriptions_file=c.text(ctx, "descriptions_file"),
        use_llm=p.get("use_llm"),
        templates=c.templates_param(ctx),
    )
    return c.given(
        AutoLabelConfig,
        clip=c.clip_spec(ctx),
        dino=c.dino_spec(ctx),
        zeroshot=zeroshot,
        tune=c.given(TuneConfig, epochs=p.get("epochs")),
        skip_tuning=None if p.get("tune") is None else not p["tune"],
        allow_template_fallback=p.get("allow_template_fallback"),
        device=c.device_param(ctx),
        gt_field=c.text(ctx, "gt_field"),
        refine=TransductiveConfig(method=p["refine"]) if p.get("refine") not in (None, REFINE_OFF) else None,
    )


class AutoLabel(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "auto_label",
            "NoLA: auto-label (whole pipeline)",
            "Embeddings, zero-shot, DINO pseudo-labels, prompt tuning, predictions",
            default_delegated=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        c.add_classes_input(ctx, inputs)
        inputs.str("descriptions_file", required=False, label="Descriptions JSON (optional)")
        inputs.bool(
            "allow_template_fallback",
            default=c.field_default(AutoLabelConfig, "allow_template_fallback"),
            label="CLIP templates for classes the file lacks",
        )
        inputs.bool(
            "use_llm",
            default=c.field_default(ZeroShotConfig, "use_llm"),
            label="Write descriptions with a local LLM (Ollama)",
        )
        c.add_templates_input(inputs)
        c.add_clip_inputs(inputs)
        c.add_dino_inputs(inputs)
        c.add_random_init_input(inputs)
        inputs.bool("tune", default=not c.field_default(AutoLabelConfig, "skip_tuning"), label="Prompt tuning")
        inputs.int("epochs", required=False, label="Tuning epochs (blank: fit hardware)")
        inputs.enum(
            "refine",
            [REFINE_OFF, *TRANSDUCTIVE_METHODS],
            default=REFINE_OFF,
            label="Also transductive labels (seconds, no training)",
            description="TransCLIP (StatA safeguard) or ZLaP from the stored vectors into nola_transductive",
        )
        c.add_field_choice(
            ctx, inputs, "gt_field", "Ground truth for evaluation (optional)", default=None, required=False
        )
        c.add_device_input(inputs)
        c.check_form(
            ctx,
            inputs,
            lambda: check_auto_label(Target(samples=c.target_samples(ctx)), c.classes_param(ctx), config(ctx)),
            {"tune_epochs": "epochs"},
        )
        return types.Property(inputs, view=types.View(label="Auto-label"))

    def execute(self, ctx):
        lines: list = []
        cfg = config(ctx)
        with c.collected_log(lines):
            s = auto_label(c.target_samples(ctx), c.classes_param(ctx), cfg, progress=c.progress_fn(ctx))
        md = "### Auto-label\n```\n" + "\n".join(summary_lines(s)) + "\n```"
        return {"summary": md, "result": c.jsonable({k: v for k, v in s.items() if k != "stages"})}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Auto-label")
