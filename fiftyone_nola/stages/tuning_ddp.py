"""Prompt tuning of a FiftyOne dataset on every rank of a torchrun job (the stage on top of
``distributed``'s primitives and ``labeling``'s single-process stage)."""

from __future__ import annotations

import logging
from typing import Optional

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core.config import resolve
from fiftyone_nola.core.distributed import DistContext, init_distributed, run_on_main
from fiftyone_nola.core.models import ClipSpec, load_clip
from fiftyone_nola.core.names import DINO_FIELD, PREDICTIONS_FIELD, ZEROSHOT_FIELD
from fiftyone_nola.core.progress import null_progress
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages import nola as labeling

logger = logging.getLogger(__name__)


def tune_prompts_distributed(
    dataset: str,
    clip=None,
    config=None,
    zeroshot_field: str = ZEROSHOT_FIELD,
    teacher_field: str = DINO_FIELD,
    run_name: str = PREDICTIONS_FIELD,
    predict=True,
    progress=None,
) -> Optional[dict]:
    """The prompt-tuning stage (then ``predict``) of a FiftyOne dataset, on every torchrun rank.

    Call it in every process (``init_distributed`` is done here). Rank 0 runs
    ``labeling.tune_prompts`` and ``labeling.predict`` exactly as a single process would; the
    other ranks receive its inputs, join its ``tune`` call (gradients and teacher labels
    sharded) and return None without reading or writing the dataset. Rank 0 returns the
    ``{"tune": ..., "predict": ...}`` summaries. Prediction runs on rank 0 alone; ``predict``
    is False (none), True or a :class:`~fiftyone_nola.stages.nola.PredictConfig`.
    """
    ctx = init_distributed(getattr(config, "device", None))
    clip = clip or ClipSpec()
    # Rank 0 settles the config so that every rank agrees on it (fitting it reads the device).
    config = run_on_main(ctx, lambda: resolve(config or pt.TuneConfig(), getattr(config, "device", None)))
    # The other ranks need exactly what tune_prompts will pass to tune (it re-reads the same
    # stored arrays; tune itself checks that all ranks agree).
    inputs = (
        run_on_main(
            ctx, lambda: labeling.tune_inputs(fo_io.get_dataset(dataset), zeroshot_field, teacher_field, run_name)
        )
        if ctx.enabled
        else None
    )
    if not ctx.is_main:
        _join_tune(ctx, clip, config, inputs)
        return None
    progress = progress or null_progress
    samples = fo_io.get_dataset(dataset)
    out = {
        "tune": labeling.tune_prompts(
            samples, zeroshot_field, teacher_field, clip, config, run_name=run_name, progress=progress
        )
    }
    if predict:
        out["predict"] = labeling.predict(
            samples,
            out["tune"]["model_dir"],
            clip,
            run_name,
            config=predict if isinstance(predict, labeling.PredictConfig) else None,
            device=config.device,
            progress=progress,
        )
    return out


def _join_tune(ctx: DistContext, clip, config, inputs) -> None:
    """A non-zero rank's part: load CLIP and join rank 0's tune call(s)."""
    model = load_clip(clip, ctx.device_for(dev.resolve_device(config.device)))
    labeling.tune_on_inputs(model, inputs, config)
