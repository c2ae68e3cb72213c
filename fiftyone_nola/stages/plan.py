"""The one re-run planner: for every step of a pipeline run, whether it runs on every sample,
updates only new or changed samples, or reuses what is stored, and why. ``auto_label``,
``auto_label_multilabel``, ``--check`` and the panel's stage table all read it.

Rule: a step redoes everything when its recorded settings, class list, model or an input it
was made from changed (or ``force``); otherwise it processes only samples it has no stored row
for, plus samples whose image changed; with nothing to do it is reused and writes nothing.
Trained steps (DINO labeller, prompt tuning, CDUL classifier) train again only when their
teacher was redone for every sample or their settings changed; new samples are labelled by the
saved model. The App's steps (class list and review flagging, similarity runs and maps) and the
evaluation are steps like the others: reused while their inputs are unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fiftyone_nola.core.names import DINO_FIELD, PREDICTIONS_FIELD, ZEROSHOT_FIELD
from fiftyone_nola.stages import brain_runs, fo_io, reuse, runs
from fiftyone_nola.stages import review as rv
from fiftyone_nola.stages.artifacts import stage_dir
from fiftyone_nola.stages.evaluation import evaluations_current
from fiftyone_nola.stages.nola import dino_run_config, tune_run_config
from fiftyone_nola.stages.transductive import transductive_run_config

RUN, UPDATE, REUSE = "run", "update", "reuse"


@dataclass
class Step:
    """One step of a run: ``action`` (run | update | reuse), the sample ids it processes, why,
    and for trained steps whether the model is trained again (else the saved one labels)."""

    name: str
    action: str
    todo: list = field(default_factory=list)
    why: str = ""
    train: bool = False
    units: Optional[int] = None  # what it counts when it processes no samples (tuning: 1 model)

    @property
    def count(self) -> int:
        return len(self.todo) if self.units is None else self.units

    def row(self) -> dict:
        action = ("train" if self.train else self.action) if self.action != REUSE else REUSE
        return {"stage": self.name, "action": action, "samples": self.count, "why": self.why}


@dataclass
class RunPlan:
    """The steps of one run, in order, and what executing them needs (resolved settings)."""

    ids: list
    steps: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def step(self, name: str) -> Optional[Step]:
        return next((s for s in self.steps if s.name == name), None)

    def rows(self) -> list[dict]:
        return [s.row() for s in self.steps]

    @property
    def all_reused(self) -> bool:
        return all(s.action == REUSE for s in self.steps)


def _samples_step(name: str, ids: list, todo: list, full: bool, why_full: str, train: bool = False) -> Step:
    """A per-sample step: everything (``full``, because ``why_full``), the missing/changed ones, or nothing."""
    if full:
        return Step(name, RUN, list(ids), why_full, train)
    if todo:
        return Step(name, UPDATE, list(todo), f"{len(todo)} new or changed samples", train)
    return Step(name, REUSE, [], "up to date: same settings and inputs, every sample has its output")


def _why_redo(force: bool, *checks: tuple[bool, str]) -> str:
    """The first reason that makes a step redo everything ("" if none)."""
    if force:
        return "forced (force=True)"
    return next((why for failed, why in checks if failed), "")


# ---------------------------------------------------------------------------- embeddings


def embedding_steps(samples, specs, ids: list, paths: list) -> tuple[list, set]:
    """One step per store: the samples to embed (new, or whose file changed) and rows to drop."""
    steps, changed = [], set()
    for spec in specs:
        todo, gone, why = reuse.embed_todo(samples, spec, ids, paths)
        changed |= todo
        action = RUN if why == "no store yet" else UPDATE if todo or gone else REUSE
        steps.append(Step(f"embeddings:{spec.family}", action, sorted(todo), why or "every sample embedded"))
    return steps, changed


# ---------------------------------------------------------------------------- NoLA


def _zeroshot_step(samples, classes, config, ids, changed) -> tuple[Step, Any]:
    zs_cfg = reuse.zeroshot_config(config)
    why = _why_redo(
        config.force,
        (runs.get_run(samples, runs.run_key_for(config.zeroshot_field)) is None, "not run yet"),
        (not reuse.up_to_date(samples, runs.run_key_for(config.zeroshot_field), zs_cfg), "its settings changed"),
        (reuse.stored_classes(samples, config.zeroshot_field) != classes, "the class list changed"),
    )
    todo = reuse.missing(samples, config.zeroshot_field, ids, changed)
    return _samples_step("zeroshot", ids, todo, bool(why), why), zs_cfg


def _labeler_step(samples, config, ids, changed, zs: Step) -> tuple[Step, Any]:
    dl_cfg = dataclasses.replace(config.dino_labeler, device=config.device)
    recorded = dino_run_config(dl_cfg, config.dino, config.zeroshot_field)
    why = _why_redo(
        False,
        (zs.action == RUN, "zero-shot is redone for every sample"),
        (not reuse.up_to_date(samples, runs.run_key_for(config.dino_field), recorded), "its settings changed"),
        (not (stage_dir(samples, config.dino_field) / "labeler").is_file(), "no saved labeller"),
    )
    todo = sorted(set(reuse.missing(samples, config.dino_field, ids, changed)) | set(zs.todo))
    return _samples_step("dino_labeler", ids, todo, bool(why), why, train=bool(why)), dl_cfg


def _tuning_steps(samples, config, ids, changed, device, labeler: Step) -> tuple[list, Any, Path]:
    tune_cfg = reuse.tune_config(config, device)
    model_dir = stage_dir(samples, f"{config.tuned_field}_model")
    recorded = tune_run_config(tune_cfg, config.clip, config.dino_field)
    why = _why_redo(
        config.force,
        (labeler.train, "the DINO labeller is trained again"),
        (not (model_dir / "meta.json").is_file(), "no tuned model yet"),
        (
            not reuse.up_to_date(samples, runs.run_key_for(f"{config.tuned_field}_model"), recorded),
            "its settings changed",
        ),
    )
    # one model: it counts 1 when trained, whatever the samples it trains on
    tune = Step("prompt_tuning", RUN if why else REUSE, [], why or "same teacher, CLIP and settings", bool(why))
    tune.units = int(bool(why))
    if why:
        pred_why = "a new tuned model"
    elif not reuse.predict_up_to_date(samples, config.tuned_field, model_dir):
        pred_why = "made by another tuned model"
    else:
        pred_why = ""
    todo = reuse.missing(samples, config.tuned_field, ids, changed)
    return [tune, _samples_step("predict", ids, todo, bool(pred_why), pred_why)], tune_cfg, model_dir


def _refine_step(samples, config, ids, inputs: list) -> Step:
    """Transductive labelling redoes everything whenever anything it reads changed (its result
    depends on every sample)."""
    recorded = transductive_run_config(config.refine, config.zeroshot_field, config.refine_from, config.dino)
    redone = [s.name for s in inputs if s.action != REUSE]
    why = _why_redo(
        config.force,
        (runs.get_run(samples, runs.run_key_for(config.refined_field)) is None, "not run yet"),
        (not reuse.up_to_date(samples, runs.run_key_for(config.refined_field), recorded), "its settings changed"),
        (bool(redone), f"{', '.join(redone)} changed"),
    )
    return Step("refine", RUN if why else REUSE, list(ids) if why else [], why or "same settings and inputs")


def review_field(config) -> str:
    """The field the review works on: the refined labels when they are the run's last word
    (refining NoLA's, or no tuning), else NoLA's predictions, else the DINO labeller's."""
    if config.refine is not None and (config.skip_tuning or config.refine_from == config.tuned_field):
        return config.refined_field
    return config.dino_field if config.skip_tuning else config.tuned_field


def _review_step(samples, classes, field_: str, inputs: list) -> Step:
    """Class list, label schema and flagging at the stored (else default) threshold."""
    ds = fo_io.root_dataset(samples)
    settings = rv.settings(ds)
    why = _why_redo(
        False,
        (list(ds.default_classes or []) != list(classes), "the class list is not stored yet"),
        (settings.get("field") != field_, f"{field_} has not been flagged for review yet"),
        (any(s.action != REUSE for s in inputs), "new predictions"),
        (settings.get("version") != rv.predictions_version(ds, field_), "new predictions"),
    )
    return Step("review", RUN if why else REUSE, [], why or "flagged on these predictions already")


def _app_steps(samples, specs) -> list:
    steps = []
    for spec in specs:
        current, why = brain_runs.app_runs_current(samples, spec.family)
        steps.append(Step(f"app:{spec.family}", REUSE if current else RUN, [], why))
    return steps


def _evaluate_step(samples, gt_field: Optional[str], fields: list) -> list:
    if not gt_field:
        return []
    current, why = evaluations_current(samples, fields, gt_field)
    return [Step("evaluate", REUSE if current else RUN, [], why)]


def plan_auto_label(samples, classes, config, device: torch.device) -> RunPlan:
    """The steps ``auto_label`` takes on ``samples`` with ``config``; reads only."""
    ids, paths = fo_io.ids_and_paths(samples)
    plan = RunPlan(ids)
    emb, changed = embedding_steps(samples, (config.clip, config.dino), ids, paths)
    zs, zs_cfg = _zeroshot_step(samples, classes, config, ids, changed)
    labeler, dl_cfg = _labeler_step(samples, config, ids, changed, zs)
    plan.steps += [*emb, zs, labeler]
    plan.settings.update(zs_cfg=zs_cfg, dl_cfg=dl_cfg)
    if not config.skip_tuning:
        tuning, tune_cfg, model_dir = _tuning_steps(samples, config, ids, changed, device, labeler)
        plan.steps += tuning
        plan.settings.update(tune_cfg=tune_cfg, model_dir=model_dir)
    if config.refine is not None:
        inputs = [s for s in plan.steps if s.name in ("embeddings:clip", "embeddings:dino", "zeroshot")]
        if config.refine_from:
            inputs += [s for s in plan.steps if s.name in ("dino_labeler", "predict")]
        plan.steps.append(_refine_step(samples, config, ids, inputs))
    if config.app_ready:
        field_ = review_field(config)
        plan.steps.append(_review_step(samples, classes, field_, [s for s in plan.steps if s.name != "review"]))
        plan.steps += _app_steps(samples, (config.clip, config.dino))
    plan.steps += _evaluate_step(samples, config.gt_field, labelled_fields(config))
    return plan


def labelled_fields(config) -> list[str]:
    """The label fields a single-label run writes (what its evaluation scores)."""
    fields = [config.zeroshot_field, config.dino_field] + ([] if config.skip_tuning else [config.tuned_field])
    return fields + ([config.refined_field] if config.refine is not None else [])


# ---------------------------------------------------------------------------- CDUL


def plan_multilabel(samples, classes, config) -> RunPlan:
    """The steps ``auto_label_multilabel`` takes on ``samples`` with ``config``; reads only."""
    from fiftyone_nola.stages.cdul import feature_specs, recorded_config

    ids, paths = fo_io.ids_and_paths(samples)
    plan = RunPlan(ids)
    specs = feature_specs(config)
    emb, changed = embedding_steps(samples, specs, ids, paths)
    key = runs.run_key_for(config.pseudo_field)
    why = _why_redo(
        False,
        (runs.get_run(samples, key) is None, "not run yet"),
        (not reuse.up_to_date(samples, key, recorded_config(config)), "its settings changed"),
        (reuse.stored_classes(samples, config.pseudo_field) != classes, "the class list changed"),
    )
    pseudo = _samples_step(
        "pseudo_labels", ids, reuse.missing(samples, config.pseudo_field, ids, changed), bool(why), why
    )
    head = stage_dir(samples, config.pred_field) / "classifier.pt"
    train_why = _why_redo(
        False,
        (pseudo.action == RUN, "pseudo-labels are redone for every sample"),
        (not head.is_file(), "no saved classifier"),
        (runs.get_run(samples, runs.run_key_for(config.pred_field)) is None, "not run yet"),
    )
    todo = sorted(set(reuse.missing(samples, config.pred_field, ids, changed)) | set(pseudo.todo))
    classifier = _samples_step("classifier", ids, todo, bool(train_why), train_why, train=bool(train_why))
    plan.steps += [*emb, pseudo, classifier]
    plan.steps += _evaluate_step(samples, config.gt_field, [config.pseudo_field, config.pred_field])
    return plan


# ---------------------------------------------------------------------------- the panel's view

# (step, run key, output field): the labelling chain, each made from the ones before it
REPLAYED = (
    ("embeddings:clip", "nola_embeddings_clip", None),
    ("embeddings:dino", "nola_embeddings_dino", None),
    ("zeroshot", ZEROSHOT_FIELD, ZEROSHOT_FIELD),
    ("dino_labeler", DINO_FIELD, DINO_FIELD),
    ("prompt_tuning", "nola_model", None),
    ("predict", PREDICTIONS_FIELD, PREDICTIONS_FIELD),
    ("refine", "nola_transductive", "nola_transductive"),
)


def replay(samples, labelled: dict, n: int) -> dict[str, Step]:
    """What a re-run with the recorded settings would do for each labelling step: the planner's
    rules on the run records and label counts alone (no image read: cheap enough for the panel).
    ``labelled``: samples with each output field; ``n``: samples in the dataset."""
    out: dict = {}
    prev: Optional[tuple] = None
    for name, key, field_ in REPLAYED:
        run = runs.get_run(samples, key)
        res = (run or {}).get("results") or {}
        count = labelled.get(field_) if field_ else res.get("index_size")
        when = res.get("recorded_at")
        if run is None:
            step = Step(name, RUN, [], "not run yet")
        elif prev and when and when < prev[1]:
            step = Step(name, RUN, [], f"made before {prev[0]} was redone")
        elif field_ is not None or name.startswith("embeddings"):
            missing = max(0, n - (count or 0)) if count is not None else 0
            step = Step(
                name,
                UPDATE if missing else REUSE,
                [],
                f"{missing} samples without its output" if missing else "up to date",
            )
            step.units = missing
        else:
            step = Step(name, REUSE, [], "up to date")
        out[name] = step
        if run and when and not name.startswith("embeddings"):
            prev = (name, when)
    return out
