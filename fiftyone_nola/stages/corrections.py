"""Corrections feed back: reviewed labels become trusted supervision for the DINO labeller and tuning."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.dino_labeler import DinoLabelerConfig
from fiftyone_nola.core.models import ClipSpec, DinoSpec
from fiftyone_nola.core.names import CORRECTIONS_FIELD, DINO_FIELD, PREDICTIONS_FIELD, ZEROSHOT_FIELD
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.nola import dino_labels, predict, tune_prompts, tune_settings

logger = logging.getLogger(__name__)


@dataclass
class CorrectionsConfig:
    """Settings of a retraining with reviewed labels; ``None`` fields fit the hardware."""

    corrections_field: str = CORRECTIONS_FIELD
    zeroshot_field: str = ZEROSHOT_FIELD
    dino_field: str = DINO_FIELD
    tuned_field: str = PREDICTIONS_FIELD
    clip: ClipSpec = field(default_factory=ClipSpec)
    dino: DinoSpec = field(default_factory=DinoSpec)
    dino_labeler: DinoLabelerConfig = field(default_factory=DinoLabelerConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    skip_tuning: bool = False  # retrain the DINO labeller only
    device: Optional[str] = None


def retrain_with_corrections(
    samples, config: Optional[CorrectionsConfig] = None, progress: ProgressFn = null_progress
) -> dict:
    """Re-run the DINO labeller (and tuning + predict) with reviewed labels as trusted picks.

    Returns how many samples' predicted labels changed in each field.
    """
    cfg = config or CorrectionsConfig()
    device = resolve_device(cfg.device)
    fo_io.check_field(samples, cfg.corrections_field)
    n_corrected = samples.exists(cfg.corrections_field).count()
    before = {
        f: dict(zip(*samples.values(["id", f"{f}.label"])))
        for f in (cfg.dino_field, cfg.tuned_field)
        if samples.has_field(f)
    }
    dino_labels(
        samples,
        cfg.zeroshot_field,
        cfg.dino,
        dataclasses.replace(cfg.dino_labeler, device=str(device)),
        cfg.dino_field,
        trusted_field=cfg.corrections_field,
        progress=progress,
    )
    if not cfg.skip_tuning:
        tune_cfg = tune_settings(cfg.tune, device)
        t = tune_prompts(
            samples,
            cfg.zeroshot_field,
            cfg.dino_field,
            cfg.clip,
            tune_cfg,
            run_name=f"{cfg.tuned_field}_corrected",
            progress=progress,
        )
        predict(samples, t["model_dir"], cfg.clip, cfg.tuned_field, device=str(device), progress=progress)
    changed = {}
    for f, old in before.items():
        new = dict(zip(*samples.values(["id", f"{f}.label"])))
        changed[f] = sum(old.get(i) != new.get(i) for i in new)
    logger.info(f"[corrections] {n_corrected} reviewed labels used; changed predictions: {changed}")
    return {"corrections": n_corrected, "changed": changed}
