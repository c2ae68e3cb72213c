"""Operators of the single-label NoLA stages: zero-shot, DINO labeler, prompt tuning, apply, evaluate."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.config import bounds
from fiftyone_nola.core.dino_labeler import DinoLabelerConfig
from fiftyone_nola.core.names import PREDICTIONS_FIELD
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.stages import nola as labeling
from fiftyone_nola.stages.evaluation import evaluate_single_label, free_eval_key
from fiftyone_nola.stages.nola import tune_settings
from fiftyone_nola.stages.validation import check_params

from . import _common as c
from ._panel_common import model_evaluation_button


def zeroshot_config(ctx) -> labeling.ZeroShotConfig:
    """The zero-shot config of the params given (None: the library's default)."""
    p = ctx.params
    return c.given(
        labeling.ZeroShotConfig,
        clip=c.clip_spec(ctx),
        descriptions_file=c.text(ctx, "descriptions_file"),
        use_llm=p.get("use_llm"),
        llm_model=c.text(ctx, "llm_model"),
        templates=c.templates_param(ctx),
        device=c.device_param(ctx),
    )


def dino_labeler_config(ctx) -> DinoLabelerConfig:
    return c.given(DinoLabelerConfig, epochs=ctx.params.get("epochs"), device=c.device_param(ctx))


def tune_config(ctx) -> TuneConfig:
    """The tuning settings given; the rest fit the hardware when the stage resolves them."""
    p = ctx.params
    return c.given(TuneConfig, epochs=p.get("epochs"), batch_size=p.get("batch_size"), max_samples=p.get("max_samples"))


def predict_config(ctx) -> labeling.PredictConfig:
    """How the tuned model predicts: the engine and precision the user set, else the config's."""
    return labeling.PredictConfig(**c.engine_params(ctx))


class ZeroShot(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "zero_shot",
            "NoLA: zero-shot labels (CDE)",
            "Label samples from stored CLIP embeddings with class-description embeddings",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        c.add_classes_input(ctx, inputs)
        inputs.str(
            "descriptions_file",
            required=False,
            label="Descriptions JSON (optional)",
            description='LaFTer/NoLA format {"class": ["description", ...]}',
        )
        inputs.bool(
            "use_llm",
            default=c.field_default(labeling.ZeroShotConfig, "use_llm"),
            label="Write descriptions with a local LLM (Ollama)",
        )
        inputs.str("llm_model", default=c.field_default(labeling.ZeroShotConfig, "llm_model"), label="Ollama model")
        c.add_templates_input(inputs)
        c.add_clip_inputs(inputs)
        c.add_random_init_input(inputs)
        inputs.str("label_field", default=c.arg_default(labeling.zero_shot, "label_field"), label="Output field")
        inputs.bool("allow_template_fallback", default=False, label="CLIP templates for classes the file lacks")
        c.add_device_input(inputs)
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                **c.text_inputs_check(ctx),
                outputs={"label_field": c.arg_param(ctx, "label_field", labeling.zero_shot)},
            ),
        )
        return types.Property(inputs, view=types.View(label="Zero-shot labels"))

    def execute(self, ctx):
        lines: list = []
        cfg = zeroshot_config(ctx)
        with c.collected_log(lines):
            s = labeling.zero_shot(
                c.target_samples(ctx), c.classes_param(ctx), cfg, c.arg_param(ctx, "label_field", labeling.zero_shot)
            )
        return {"summary": c.markdown_summary("Zero-shot", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Zero-shot")


class DinoLabels(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "dino_labels",
            "NoLA: DINO pseudo-labels",
            "Train the DINO labeling network on confident zero-shot picks and label every sample",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.str(
            "zeroshot_field", default=c.arg_default(labeling.dino_labels, "zeroshot_field"), label="Zero-shot field"
        )
        c.add_dino_inputs(inputs)
        c.add_random_init_input(inputs)
        inputs.int("epochs", default=c.field_default(DinoLabelerConfig, "epochs"), label="MLP epochs")
        inputs.str(
            "trusted_field",
            required=False,
            label="Reviewed labels field (optional)",
            description="corrections added as trusted supervision",
        )
        inputs.str("label_field", default=c.arg_default(labeling.dino_labels, "label_field"), label="Output field")
        c.add_device_input(inputs)
        p = ctx.params
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                dino=c.dino_spec(ctx),
                device=c.device_param(ctx),
                stages={"zeroshot_field": (c.arg_param(ctx, "zeroshot_field", labeling.dino_labels), "zero-shot")},
                fields={"trusted_field": (p.get("trusted_field"), ("Classification",))}
                if p.get("trusted_field")
                else None,
                outputs={"label_field": c.arg_param(ctx, "label_field", labeling.dino_labels)},
                ranges={"epochs": (p.get("epochs"), *bounds(DinoLabelerConfig, "epochs").range)},
            ),
        )
        return types.Property(inputs, view=types.View(label="DINO pseudo-labels"))

    def execute(self, ctx):
        lines: list = []
        cfg = dino_labeler_config(ctx)
        with c.collected_log(lines):
            s = labeling.dino_labels(
                c.target_samples(ctx),
                c.arg_param(ctx, "zeroshot_field", labeling.dino_labels),
                c.dino_spec(ctx),
                cfg,
                c.arg_param(ctx, "label_field", labeling.dino_labels),
                trusted_field=c.text(ctx, "trusted_field"),
            )
        return {"summary": c.markdown_summary("DINO pseudo-labels", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "DINO pseudo-labels")


class TunePrompts(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "tune_prompts",
            "NoLA: prompt tuning",
            "Tune CLIP's visual prompts on the DINO labeler's pseudo-labels, then predict",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.str(
            "zeroshot_field", default=c.arg_default(labeling.dino_labels, "zeroshot_field"), label="Zero-shot field"
        )
        inputs.str(
            "teacher_field",
            default=c.arg_default(labeling.tune_prompts, "teacher_field"),
            label="Teacher (DINO labeler) field",
        )
        c.add_clip_inputs(inputs)
        c.add_random_init_input(inputs)
        inputs.int("epochs", required=False, label="Epochs (blank: fit hardware)")
        inputs.int("batch_size", required=False, label="Batch size (blank: fit hardware)")
        inputs.int("max_samples", required=False, label="Train on at most N samples (blank: fit hardware; 0: all)")
        inputs.str("label_field", default=c.arg_default(labeling.predict, "label_field"), label="Output field")
        c.add_engine_inputs(inputs, labeling.PredictConfig)
        c.add_device_input(inputs)
        p = ctx.params
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                clip=c.clip_spec(ctx),
                prompt_tuning=True,
                device=c.device_param(ctx),
                stages={
                    "zeroshot_field": (c.arg_param(ctx, "zeroshot_field", labeling.dino_labels), "zero-shot"),
                    "teacher_field": (c.arg_param(ctx, "teacher_field", labeling.tune_prompts), "DINO labeler"),
                },
                outputs={"label_field": c.arg_param(ctx, "label_field", labeling.predict)},
                ranges={
                    "epochs": (p.get("epochs"), 1, None, True),
                    "batch_size": (p.get("batch_size"), 1, None, True),
                    "max_samples": (p.get("max_samples"), 0, None, True),
                },
            ),
        )
        return types.Property(inputs, view=types.View(label="Prompt tuning"))

    def execute(self, ctx):
        lines: list = []
        with c.collected_log(lines):
            s = labeling.tune_and_predict(
                c.target_samples(ctx),
                c.clip_spec(ctx),
                tune_settings(tune_config(ctx), c.device_param(ctx)),
                predict_config(ctx),
                c.arg_param(ctx, "label_field", labeling.predict),
                c.arg_param(ctx, "zeroshot_field", labeling.dino_labels),
                c.arg_param(ctx, "teacher_field", labeling.tune_prompts),
                progress=c.progress_fn(ctx),
            )
        return {"summary": c.markdown_summary("Prompt tuning", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Prompt tuning")


class ApplyModel(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "apply_tuned_model",
            "NoLA: apply a saved tuned model",
            "Predict with a saved prompt-tuned CLIP on the dataset, view or selection",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.str(
            "model_dir",
            required=True,
            label="Tuned model directory",
            description="the model_dir printed by prompt tuning",
        )
        c.add_clip_inputs(inputs)
        c.add_random_init_input(inputs)
        inputs.str("label_field", default=c.arg_default(labeling.predict, "label_field"), label="Output field")
        c.add_engine_inputs(inputs, labeling.PredictConfig)
        c.add_device_input(inputs)
        p = ctx.params
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                c.target_samples(ctx),
                clip=c.clip_spec(ctx),
                device=c.device_param(ctx),
                files={"model_dir": p.get("model_dir") and f"{p['model_dir']}/meta.json"},
                outputs={"label_field": c.arg_param(ctx, "label_field", labeling.predict)},
            ),
        )
        return types.Property(inputs, view=types.View(label="Apply tuned model"))

    def execute(self, ctx):
        p = ctx.params
        lines: list = []
        with c.collected_log(lines):
            s = labeling.predict(
                c.target_samples(ctx),
                p["model_dir"],
                c.clip_spec(ctx),
                c.arg_param(ctx, "label_field", labeling.predict),
                config=predict_config(ctx),
                device=c.device_param(ctx),
                progress=c.progress_fn(ctx),
            )
        return {"summary": c.markdown_summary("Predictions", s, lines), "result": c.jsonable(s)}

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Predictions")


class Evaluate(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "evaluate_labels",
            "NoLA: evaluate against ground truth",
            "Accuracy / per-class report / confusion matrix of a predicted field",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Evaluate", default_target="DATASET")
        c.add_field_choice(ctx, inputs, "pred_field", "Predicted field", default=PREDICTIONS_FIELD)
        c.add_field_choice(ctx, inputs, "gt_field", "Ground-truth field", default="ground_truth")
        inputs.bool(
            "final_labels",
            default=False,
            label="Evaluate the final labels (reviewer corrections win)",
            description="the labels an export writes: nola_reviewed where a reviewer corrected, else the prediction",
        )
        p = ctx.params
        pred = p.get("pred_field") or PREDICTIONS_FIELD
        inputs.str(
            "eval_key",
            # the first key not taken: the form never opens refusing its own default
            default=free_eval_key(ctx.dataset, pred, bool(p.get("final_labels"))) if ctx.dataset else None,
            label="Evaluation key",
            description="the name under which the Model Evaluation panel lists it",
        )
        inputs.bool("overwrite", default=False, label="Replace an existing evaluation with this key")
        # set by the NoLA panel, which opens the Model Evaluation panel itself: no result dialog
        inputs.bool("from_panel", default=False, view=types.HiddenView())

        def check():
            from fiftyone_nola.stages.validation import Problem

            report = check_params(
                _eval_target(ctx), fields={k: (p.get(k), ("Classification",)) for k in ("pred_field", "gt_field")}
            )
            key = c.text(ctx, "eval_key")
            if ctx.dataset is not None and key in ctx.dataset.list_evaluations() and not p.get("overwrite"):
                report.problems.append(
                    Problem(
                        "eval_key", f"an evaluation '{key}' already exists", "choose another key, or tick 'Replace'"
                    )
                )
            if p.get("pred_field") and p.get("pred_field") == p.get("gt_field"):
                report.problems.append(Problem("gt_field", "is the predicted field itself", "choose ground truth"))
            return report

        c.check_form(ctx, inputs, check)
        return types.Property(inputs, view=types.View(label="Evaluate"))

    def execute(self, ctx):
        p = ctx.params
        samples = _eval_target(ctx)
        s = evaluate_single_label(
            samples,
            p["pred_field"],
            p["gt_field"],
            eval_key=c.text(ctx, "eval_key"),
            overwrite=bool(p.get("overwrite")),
            final_labels=bool(p.get("final_labels")),
        )
        key, pred = s["eval_key"], s["pred_field"]
        md = (
            f"### Evaluation `{key}`: {pred} vs {p['gt_field']}\n"
            f"- **accuracy**: {c.r3(s['accuracy'])}\n- **macro F1**: {c.r3(s['macro_f1'])}\n"
            f"- **samples**: {s['samples']}\n\n**Open Model Evaluation** (below) and pick `{key}` for the "
            "per-class report and the confusion matrix."
        )
        short = {k: (c.r3(v) if isinstance(v, float) else v) for k, v in s.items() if k != "per_class"}
        c.show_review_fields(ctx, extra=(pred,))
        return {"summary": md, "result": c.jsonable(short)}

    def resolve_output(self, ctx):
        if ctx.params.get("from_panel"):
            return None  # the panel shows the result and opens the Model Evaluation panel
        out = c.summary_output(ctx, "Evaluation")
        model_evaluation_button(out.type)
        return out


def _eval_target(ctx):
    if ctx.params.get("view_target") or ctx.request_params.get("view_target"):
        return ctx.target_view()
    return ctx.dataset
