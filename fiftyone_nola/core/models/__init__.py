"""Resolve and load the CLIP (open_clip) and DINO (timm) models every stage uses.

A model is named by a spec:

* CLIP: an open_clip architecture plus a pretrained tag (``ViT-B-32`` + ``openai``), an
  ``hf-hub:org/repo`` name, or a local checkpoint file.
* DINO: a timm model name (``vit_base_patch16_224.dino``) plus an optional local checkpoint.

Weights are looked up in this order: an explicit checkpoint path; the models directory
(``NOLA_MODELS_DIR``, default ``~/.fiftyone_nola/models``) with the layout::

    <models_dir>/clip/<arch>/<tag>.{pt,bin,safetensors}     e.g. clip/ViT-B-32/openai.pt
    <models_dir>/dino/<timm name>.{safetensors,pth,bin}     e.g. dino/vit_base_patch16_224.dino.safetensors
    <models_dir>/dino/<timm name>/{model.safetensors,pytorch_model.bin}   (timm's hub files)
    <models_dir>/dino/<official release file>               e.g. dino/dino_vitbase16_pretrain.pth

then the model's hub (only when nothing local exists). ``random_init=True`` (or
``NOLA_RANDOM_INIT=1``) skips weights entirely for smoke runs and tests: labels from such
models are meaningless.

Modules: ``specs`` (specs, loaded-model record, models dir), ``clip``, ``dino`` and
``dino_weights`` (loading), ``cache`` (one load per process), ``registry`` (both families).
"""

from fiftyone_nola.core.models.cache import MODEL_CACHE_SIZE, clear_model_cache
from fiftyone_nola.core.models.clip import clip_scoring, default_pretrained, load_clip, pretrained_tag
from fiftyone_nola.core.models.dino import (
    DINO_PREPROCESS,
    NOLA_MEAN,
    NOLA_STD,
    concrete_dino,
    load_dino,
    nola_transform,
)
from fiftyone_nola.core.models.dino_weights import DINO_RELEASE_FILES, DINO_WEIGHT_FORMATS, TIMM_WEIGHT_FILES
from fiftyone_nola.core.models.registry import load_model, spec_key, weights_available
from fiftyone_nola.core.models.scoring import SCORING_KINDS, Scoring, model_scoring
from fiftyone_nola.core.models.specs import (
    _CONFIG_DIR,
    _TINY_TIMM,
    RANDOM_INIT_SEED,
    TINY_CLIP_ARCH,
    TINY_DINO_NAME,
    TINY_DINOV2_NAME,
    TINY_DINOV3_NAME,
    TINY_PE_ARCH,
    TINY_SIGLIP_ARCH,
    ClipSpec,
    DinoSpec,
    LoadedModel,
    dino_generation,
    env_flag,
    hub_reachable,
    models_dir,
    random_init_default,
    tiny_clip_spec,
    tiny_dino_spec,
)
from fiftyone_nola.core.models.tokenizers import hf_tokenizer_name, tokenizer_available, tokenizer_dir
from fiftyone_nola.core.models.towers import prompt_support

__all__ = [
    "DINO_PREPROCESS",
    "DINO_RELEASE_FILES",
    "DINO_WEIGHT_FORMATS",
    "MODEL_CACHE_SIZE",
    "NOLA_MEAN",
    "NOLA_STD",
    "RANDOM_INIT_SEED",
    "SCORING_KINDS",
    "TIMM_WEIGHT_FILES",
    "TINY_CLIP_ARCH",
    "TINY_DINO_NAME",
    "TINY_DINOV2_NAME",
    "TINY_DINOV3_NAME",
    "TINY_PE_ARCH",
    "TINY_SIGLIP_ARCH",
    "_CONFIG_DIR",
    "_TINY_TIMM",
    "ClipSpec",
    "DinoSpec",
    "LoadedModel",
    "Scoring",
    "clear_model_cache",
    "clip_scoring",
    "concrete_dino",
    "default_pretrained",
    "dino_generation",
    "env_flag",
    "hf_tokenizer_name",
    "hub_reachable",
    "load_clip",
    "load_dino",
    "load_model",
    "model_scoring",
    "models_dir",
    "nola_transform",
    "pretrained_tag",
    "prompt_support",
    "random_init_default",
    "spec_key",
    "tiny_clip_spec",
    "tiny_dino_spec",
    "tokenizer_available",
    "tokenizer_dir",
    "weights_available",
]
