"""fiftyone-nola: label-free auto-labeling of image datasets (NoLA, CDUL) for FiftyOne.

The public API: every stage function and its config. Names are imported lazily so that
``import fiftyone_nola`` stays cheap; :mod:`fiftyone_nola.core` works without FiftyOne,
:mod:`fiftyone_nola.stages` reads and writes datasets.
"""

import time
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib

STARTED = time.perf_counter()  # when the package was first imported: a command's clock starts here


def _source_version() -> str:
    """pyproject.toml's version: a source tree or a plugin downloaded by FiftyOne, never installed."""
    try:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


try:
    __version__ = version("fiftyone-nola")
except PackageNotFoundError:
    __version__ = _source_version()

_LAZY = {
    # one call
    "auto_label": "pipeline",
    "AutoLabelConfig": "pipeline",
    "auto_label_multilabel": "pipeline",
    "MultiLabelConfig": "stages.cdul",
    "validate": "pipeline",
    # models
    "ClipSpec": "core.models",
    "DinoSpec": "core.models",
    "load_clip": "core.models",
    "load_dino": "core.models",
    "weights_available": "core.models",
    "tiny_clip_spec": "core.models",  # tiny random models: the demos and tests without weights
    "tiny_dino_spec": "core.models",
    "resolve": "core.config",  # fill a config's None ("fit the hardware") fields for a device
    "import_images": "stages.fo_io",
    # embeddings
    "compute_embeddings": "stages.embeddings",
    "load_embeddings": "stages.stage",
    "EmbedConfig": "core.embed",
    "compute_embeddings_ray": "stages.embeddings_ray",
    "RayEmbedConfig": "stages.embeddings_ray",
    "register_brain_runs": "stages.brain_runs",
    # NoLA stages
    "zero_shot": "stages.nola",
    "ZeroShotConfig": "stages.nola",
    "DescribeConfig": "core.descriptions",
    "DescriptionSet": "core.descriptions",
    "generate_descriptions": "core.descriptions",
    "load_descriptions": "core.descriptions",
    "load_class_names": "core.descriptions",
    "dino_labels": "stages.nola",
    "DinoLabelerConfig": "core.dino_labeler",
    "tune_prompts": "stages.nola",
    "TuneConfig": "core.prompt_tuning",
    "tune_prompts_distributed": "stages.tuning_ddp",
    "predict": "stages.nola",
    "PredictConfig": "stages.nola",
    "load_model": "stages.fo_models",
    # transductive labeling (no training): TransCLIP / StatA / ZLaP on the stored embeddings
    "transductive_labels": "stages.transductive",
    "TransductiveConfig": "core.transductive.config",
    "load_multilabel_model": "stages.fo_cdul_model",
    # CDUL stages
    "multilabel_pseudo_labels": "stages.cdul",
    "train_multilabel": "stages.cdul",
    "apply_multilabel": "stages.cdul",
    "evaluate_multilabel_stages": "stages.cdul",
    "CropConfig": "core.cdul",
    "TrainConfig": "core.cdul",
    # review, evaluation, export
    "evaluate_single_label": "stages.evaluation",
    "evaluate_multilabel": "stages.evaluation",
    "flag_samples": "stages.review",
    "decide": "stages.review",
    "propagate_corrections": "stages.review",
    "accept_above": "stages.review",
    "calibration": "stages.evaluation",
    "retrain_with_corrections": "stages.corrections",
    "CorrectionsConfig": "stages.corrections",
    "export_accepted": "stages.export",
    # random audit: accuracy with intervals, a certified threshold
    "AuditConfig": "core.audit.config",
    "draw_audit": "stages.audit",
    "audit_queue": "stages.audit",
    "audit_decide": "stages.audit",
    "audit_progress": "stages.audit",
    "audit_report": "stages.audit",
    "simulate_audit": "stages.audit",
    "flag_uncertified": "stages.audit",
    # errors
    "NolaError": "core.errors",
    "InvalidInputError": "core.errors",
    "ValidationError": "core.errors",
    "ModelNotFoundError": "core.errors",
    "JobBusyError": "core.errors",
    # one whole job per dataset: a second one waits for the first and reuses its work
    "dataset_job": "stages.jobs",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fiftyone_nola' has no attribute {name!r}")


def __dir__():
    return __all__
