"""Operator: compute CLIP / DINO embeddings into FAISS indexes."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.index import INDEX_TYPES
from fiftyone_nola.stages.brain_runs import register_brain_runs
from fiftyone_nola.stages.embeddings import compute_embeddings
from fiftyone_nola.stages.validation import Target, check_embed

from . import _common as c

_FAMILY = c.arg_default(compute_embeddings, "family")


def _config(ctx) -> EmbedConfig:
    p = ctx.params
    return c.given(
        EmbedConfig,
        batch_size=p.get("batch_size"),
        num_workers=p.get("num_workers"),
        device=c.device_param(ctx),
        draft_decode=p.get("draft_decode"),
        index_type=c.text(ctx, "index_type"),
        **c.engine_params(ctx),
    )


class ComputeEmbeddings(foo.Operator):
    @property
    def config(self):
        return c.operator_config(
            "compute_embeddings",
            "NoLA: compute embeddings",
            "CLIP and/or DINO image embeddings into on-disk FAISS indexes (incremental)",
            default_delegated=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        c.target_samples(ctx)
        inputs.enum("family", ["both", "clip", "dino"], default=_FAMILY, label="Models", view=types.RadioGroup())
        c.add_clip_inputs(inputs)
        c.add_dino_inputs(inputs)
        c.add_random_init_input(inputs)
        inputs.int("batch_size", required=False, label="Batch size (blank: fit hardware)")
        inputs.int("num_workers", required=False, label="Decode workers (blank: fit hardware)")
        inputs.bool(
            "draft_decode", default=c.field_default(EmbedConfig, "draft_decode"), label="Fast JPEG draft decoding"
        )
        inputs.enum(
            "index_type",
            list(INDEX_TYPES),
            default=c.field_default(EmbedConfig, "index_type"),
            label="Search index",
            description="flat: exact; ivf / hnsw: fast approximate; ivfpq: compressed, "
            "for millions of images (exact re-ranking)",
        )
        c.add_engine_inputs(inputs, EmbedConfig)
        c.add_device_input(inputs)
        c.check_form(
            ctx,
            inputs,
            lambda: check_embed(
                Target(samples=c.target_samples(ctx)),
                c.text(ctx, "family", _FAMILY),
                c.clip_spec(ctx),
                c.dino_spec(ctx),
                _config(ctx),
            ),
        )
        return types.Property(inputs, view=types.View(label="Compute embeddings"))

    def execute(self, ctx):
        lines: list = []
        cfg = _config(ctx)
        with c.collected_log(lines):
            summary = compute_embeddings(
                c.target_samples(ctx),
                c.text(ctx, "family", _FAMILY),
                c.clip_spec(ctx),
                c.dino_spec(ctx),
                cfg,
                progress=c.progress_fn(ctx),
            )
            for family, fam_summary in summary.items():  # similarity search and map in the App, no setup
                fam_summary["app"] = register_brain_runs(ctx.dataset, family)
        return {
            "summary": "\n\n".join(c.markdown_summary(f"{k.upper()} embeddings", v) for k, v in summary.items()),
            "result": c.jsonable(summary),
        }

    def resolve_output(self, ctx):
        return c.summary_output(ctx, "Embeddings")
