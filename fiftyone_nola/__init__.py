"""fiftyone-nola: label-free auto-labeling of image datasets (NoLA, CDUL) for FiftyOne.

The one-call entry points are imported lazily so that ``import fiftyone_nola`` stays cheap and
the pure modules (models, zeroshot, dino_labeler, multilabel, index) work without FiftyOne.
"""

__version__ = "0.1.0"

_LAZY = {
    "auto_label": "pipeline",
    "AutoLabelConfig": "pipeline",
    "auto_label_multilabel": "multilabel_pipeline",
    "MultiLabelConfig": "multilabel_pipeline",
    "compute_embeddings": "embeddings",
    "compute_embeddings_ray": "distributed_embeddings",
    "RayEmbedConfig": "distributed_embeddings",
    "tune_prompts_distributed": "distributed_tuning",
    "zero_shot": "labeling",
    "dino_labels": "labeling",
    "tune_prompts": "labeling",
    "predict": "labeling",
    "ClipSpec": "models",
    "DinoSpec": "models",
    "EmbedConfig": "embed",
    "validate": "validation",
    "ValidationError": "errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fiftyone_nola' has no attribute {name!r}")
