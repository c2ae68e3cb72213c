"""Operators: generate class descriptions with a local LLM, import/export the NoLA JSON format."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core import descriptions as dsc
from fiftyone_nola.core.classes import resolve_classes
from fiftyone_nola.stages.validation import check_params

from . import _common as c


class GenerateDescriptions(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="generate_descriptions",
            label="NoLA: class descriptions",
            description="Write class descriptions with a local LLM (Ollama), or templates; save them as JSON",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.add_classes_input(ctx, inputs)
        inputs.enum(
            "source",
            ["llm", "templates", "file"],
            default="llm",
            label="Source",
            description="llm falls back to templates, with a warning, when no Ollama server answers",
            view=types.RadioGroup(),
        )
        inputs.str("llm_model", default=c.field_default(dsc.DescribeConfig, "model"), label="Ollama model")
        inputs.str("ollama_host", required=False, label="Ollama host (default: OLLAMA_HOST)")
        inputs.int(
            "answers_per_question",
            default=c.field_default(dsc.DescribeConfig, "answers_per_question"),
            label="Answers per question",
        )
        inputs.str("import_file", required=False, label="Import from JSON file (source=file)")
        inputs.str("output_file", required=True, label="Save descriptions to (JSON)")
        p = ctx.params
        source = p.get("source", "llm")
        c.check_form(
            ctx,
            inputs,
            lambda: check_params(
                ctx.dataset,
                need_samples=False,
                classes=c.classes_param(ctx),
                min_classes=1,
                descriptions_file=p.get("import_file") if source == "file" else None,
                allow_template_fallback=True,
                files={"import_file": p.get("import_file")} if source == "file" else None,
                ranges={"answers_per_question": (p.get("answers_per_question"), 1, 50, True)},
                writable={"output_file": (p.get("output_file"), "descriptions file", True)},
            ),
        )
        return types.Property(inputs, view=types.View(label="Class descriptions"))

    def execute(self, ctx):
        p = ctx.params
        classes = resolve_classes(c.classes_param(ctx), ctx.dataset)
        llm = c.given(
            dsc.DescribeConfig,
            model=c.text(ctx, "llm_model"),
            host=c.text(ctx, "ollama_host"),
            answers_per_question=p.get("answers_per_question"),
        )
        ds = dsc.describe_classes(
            classes, p.get("source", "llm"), p.get("import_file"), llm, progress=c.progress_fn(ctx)
        )
        path = dsc.save_descriptions(ds, p["output_file"])
        summary = {
            "classes": len(classes),
            "descriptions": sum(len(v) for v in ds.descriptions.values()),
            "sources": sorted(set(ds.source.values())),
            "file": str(path),
            "warnings": len(ds.warnings),
        }
        return {
            "summary": c.markdown_summary("Descriptions", summary, list(ds.warnings)),
            "result": c.jsonable(summary),
        }

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Descriptions")
