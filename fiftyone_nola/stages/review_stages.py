"""What the NoLA panel shows per stage: whether it ran on this dataset, how fresh it is, and the
progress of the plugin's delegated runs on it."""

from __future__ import annotations

from typing import Optional

import fiftyone as fo
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

from fiftyone_nola.core.names import DINO_FIELD, PREDICTIONS_FIELD, ZEROSHOT_FIELD
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.plan import REUSE, UPDATE, replay

# (row, planner step, run key, output field, operator)
STAGES = (
    ("CLIP embeddings", "embeddings:clip", "nola_embeddings_clip", None, "compute_embeddings"),
    ("DINO embeddings", "embeddings:dino", "nola_embeddings_dino", None, "compute_embeddings"),
    ("Zero-shot (CDE)", "zeroshot", ZEROSHOT_FIELD, ZEROSHOT_FIELD, "zero_shot"),
    ("DINO labeller", "dino_labeler", DINO_FIELD, DINO_FIELD, "dino_labels"),
    ("Prompt tuning", "prompt_tuning", "nola_model", None, "tune_prompts"),
    ("Predictions", "predict", PREDICTIONS_FIELD, PREDICTIONS_FIELD, "apply_tuned_model"),
    ("Transductive", "refine", "nola_transductive", "nola_transductive", "transductive_labels"),
)


def _model_name(config: dict) -> str:
    """The model a run config names (its tuned CLIP or embedding spec, recorded as dict or repr)."""
    for key in ("clip", "spec"):
        fields = runs.recorded_fields(config.get(key)) or {}
        if fields.get("arch") or fields.get("name"):
            return str(fields.get("arch") or fields.get("name"))
    return ""


MODEL_NAME_CHARS = 40


def _short(text: str, n: int = MODEL_NAME_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


STAGE_OUTPUT_FIELDS = tuple(f for _, _, _, f, _ in STAGES if f)


def _state(step) -> str:
    """A planner step as the table says it: fresh, what a re-run would add, or why it is stale."""
    if step.action == REUSE:
        return "fresh"
    if step.action == UPDATE:
        return f"{step.count} to add"
    return "not run" if step.why == "not run yet" else f"stale: {step.why}"


def stage_status(samples, labelled: Optional[dict] = None, n: Optional[int] = None) -> list[dict]:
    """Each stage: has it run, on how many samples, with which model, and what a re-run with its
    recorded settings would do (the re-run planner's rules: fresh, samples to add, or stale and why).

    ``labelled`` / ``n``: how many samples have each stage's field, and how many there are, when
    the caller counted them already (the panel does, in its one aggregation)."""
    ds = fo_io.root_dataset(samples)
    if labelled is None or n is None:
        fields = [f for f in STAGE_OUTPUT_FIELDS if ds.has_sample_field(f)]
        counted = samples.aggregate([fo.Count(), *(fo.Count(f) for f in fields)])  # one pass
        n, labelled = counted[0], dict(zip(fields, counted[1:]))
    plan = replay(ds, labelled, n)
    rows = []
    for name, step_name, key, field, op in STAGES:
        run = runs.get_run(ds, key)
        if run is None and step_name == "refine":
            continue  # an optional step never used on this dataset: no row
        res = (run or {}).get("results") or {}
        count = labelled.get(field) if field and ds.has_sample_field(field) else None
        if run and count is None:
            count = res.get("index_size") or res.get("samples")
        model = res.get("model_key") or _model_name((run or {}).get("config") or {})
        rows.append(
            {
                "stage": name,
                "state": _state(plan[step_name]),
                "samples": f"{count or 0}/{n}",
                "model": _short(str(model)),
                "operator": op,
                "seconds": round(float(res["seconds"]), 1) if res.get("seconds") else None,
            }
        )
    return rows


def active_jobs(samples, plugin: str) -> list[dict]:
    """The plugin's delegated operations on this dataset that have not ended, with the progress
    their operators report (``ctx.set_progress``: a fraction and "message done/total")."""
    ds = fo_io.root_dataset(samples)
    jobs = []
    for state in (ExecutionRunState.RUNNING, ExecutionRunState.QUEUED, ExecutionRunState.SCHEDULED):
        for op in DelegatedOperationService().list_operations(dataset_name=ds.name, run_state=state):
            if not str(op.operator).startswith(plugin + "/"):
                continue
            status = op.status
            frac = getattr(status, "progress", None)
            params = getattr(op.context, "params", None) or {}
            jobs.append(
                {
                    "id": str(op.id),
                    "operator": op.operator.split("/")[-1],
                    "state": str(state),
                    "family": params.get("family"),
                    "label": getattr(status, "label", None) or "",
                    "percent": None if frac is None else round(100 * float(frac)),
                }
            )
    return jobs


def with_jobs(rows: list[dict], jobs: list[dict]) -> list[dict]:
    """Stage rows with the state of a job running (or waiting) for that stage, e.g. "running 12/40 (30%)"."""
    out = []
    for row in rows:
        row = dict(row)
        for job in jobs:
            fam = job.get("family")
            if job["operator"] == row["operator"] and (fam in (None, "both") or row["stage"].lower().startswith(fam)):
                done = f" {job['label'].split()[-1]}" if job["label"] else ""
                pct = f" ({job['percent']}%)" if job["percent"] is not None else ""
                row["state"] = f"{job['state']}{done}{pct}"
        out.append(row)
    return out
