"""Corrections feed back: reviewed labels become trusted supervision for the DINO labeller and tuning."""

from __future__ import annotations

from typing import Callable, Optional

from fiftyone_nola.core.models import ClipSpec, DinoSpec
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.stages.nola import dino_labels, predict, tune_prompts
from fiftyone_nola.stages.review import CORRECTIONS_FIELD


def retrain_with_corrections(
    samples,
    corrections_field: str = CORRECTIONS_FIELD,
    zeroshot_field: str = "nola_zeroshot",
    dino_field: str = "nola_dino",
    tuned_field: str = "nola",
    clip: Optional[ClipSpec] = None,
    dino: Optional[DinoSpec] = None,
    tune: bool = True,
    tune_overrides: Optional[dict] = None,
    device: Optional[str] = None,
    progress: ProgressFn = null_progress,
    log: Callable[[str], None] = print,
) -> dict:
    """Re-run the DINO labeller (and tuning + predict) with reviewed labels as trusted picks.

    Returns how many samples' predicted labels changed in each field.
    """
    from fiftyone_nola.core import dino_labeler as dl
    from fiftyone_nola.core import prompt_tuning as pt
    from fiftyone_nola.core.device import resolve
    from fiftyone_nola.stages import fo_io

    fo_io.check_field(samples, corrections_field)
    n_corrected = samples.exists(corrections_field).count()
    before = {f: dict(zip(*samples.values(["id", f"{f}.label"])))
              for f in (dino_field, tuned_field) if samples.has_field(f)}
    dino_labels(samples, zeroshot_field, dino, dl.DinoLabelerConfig(device=device), dino_field,
                trusted_field=corrections_field, progress=progress, log=log)
    if tune:
        # Machine-fitted settings, changed only where the caller says so.
        cfg = resolve(pt.TuneConfig(**(tune_overrides or {})), device)
        t = tune_prompts(samples, zeroshot_field, dino_field, clip, cfg, run_name=f"{tuned_field}_corrected",
                         progress=progress, log=log)
        predict(samples, t["model_dir"], clip, tuned_field, device=device, progress=progress, log=log)
    changed = {}
    for f, old in before.items():
        new = dict(zip(*samples.values(["id", f"{f}.label"])))
        changed[f] = sum(old.get(i) != new.get(i) for i in new)
    log(f"[corrections] {n_corrected} reviewed labels used; changed predictions: {changed}")
    return {"corrections": n_corrected, "changed": changed}
