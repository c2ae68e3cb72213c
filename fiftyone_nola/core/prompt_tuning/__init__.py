"""NoLA stage 3: visual prompt tuning of CLIP's vision tower against a teacher (no FiftyOne here).

The student is CLIP's ViT with learnable prompt tokens inserted after the CLS token (shallow
VPT), followed by a bias-free linear head initialised from the class description embeddings.
Only the prompts, the LayerNorms of the vision tower and the head are trained, on a strongly
augmented view with label-smoothing cross-entropy against hard teacher labels.

Unlike the official code, which runs the DINO teacher on the weak view of every batch, the
teacher labels are computed once beforehand (from stored DINO embeddings) and looked up per
step; ``tune(teacher=OnlineTeacher(...))`` restores the online behaviour for benchmarks. No ground truth
is used anywhere: the epoch to keep is the last one or the one agreeing most with the teacher
on held-aside images.

Randomness is a pure function of the seed: the epoch's shuffle of ``(seed, epoch)`` and each
image's augmentation of ``(seed, epoch, index)``, whatever the number of loader workers or
processes. That is what makes ``tune`` data-parallel under torchrun without changing its result:
with a process group of N ranks (see ``distributed``) each rank trains on its slice of
every global batch, and its teacher labels; gradients are summed over ranks and divided by the
global batch's size, so each step is the single-process step (up to float rounding).

Modules: ``config`` (TuneConfig), ``transforms`` (the two views), ``model`` (the prompted ViT
and its head), ``train`` (``tune``), ``step`` (one optimiser step), ``checkpoint`` (resumable
checkpoints, tuned models on disk), ``predict`` (``predict_tuned``).
"""

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.prompt_tuning.checkpoint import (
    CHECKPOINT_NAME,
    META_NAME,
    TUNED_NAME,
    load_tuned,
    save_tuned,
    tuned_model_id,
)
from fiftyone_nola.core.prompt_tuning.config import ALL_SAMPLES, SELECTIONS, TuneConfig
from fiftyone_nola.core.prompt_tuning.model import HEAD_FORMULATION, PromptedClassifier, PromptedVisual, make_optimizer
from fiftyone_nola.core.prompt_tuning.model import _param_groups as _param_groups  # reached by tests
from fiftyone_nola.core.prompt_tuning.predict import predict_tuned
from fiftyone_nola.core.prompt_tuning.step import _Step as _Step  # reached by tests
from fiftyone_nola.core.prompt_tuning.train import OnlineTeacher, TuneResult, stratified_subset, tune
from fiftyone_nola.core.prompt_tuning.transforms import _KeyedImageDataset as _KeyedImageDataset  # reached by tests
from fiftyone_nola.core.prompt_tuning.transforms import (
    clip_mean_std,
    model_weak_transform,
    strong_transform,
    weak_transform,
)

__all__ = [
    "ALL_SAMPLES",
    "CHECKPOINT_NAME",
    "HEAD_FORMULATION",
    "META_NAME",
    "SELECTIONS",
    "TUNED_NAME",
    "OnlineTeacher",
    "PromptedClassifier",
    "PromptedVisual",
    "TuneConfig",
    "TuneResult",
    "clip_mean_std",
    "dev",
    "load_tuned",
    "make_optimizer",
    "predict_tuned",
    "save_tuned",
    "strong_transform",
    "stratified_subset",
    "tune",
    "tuned_model_id",
    "model_weak_transform",
    "weak_transform",
]
