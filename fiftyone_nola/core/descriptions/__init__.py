"""Class descriptions for the CDE zero-shot classifier: LLM-written, imported, or templates.

NoLA/LaFTer average CLIP text embeddings over, per class, LLM answers to five questions
(asked several times each) plus CLIP's hand-written prompt templates. This package gets those
texts three ways:

* ``generate_descriptions``: ask a local LLM through Ollama. Every answer is cached on disk as
  it arrives, keyed by (class, prompt set, model), so nothing is asked twice and a crash keeps
  what was obtained. If no server answers, classes fall back to templates with one warning.
* ``load_descriptions`` / ``save_descriptions``: the LaFTer/NoLA JSON ``{"class": ["...", ...]}``.
* ``template_descriptions``: templates only (CLIP's ImageNet ensemble by default).

``DescriptionSet.texts_for(c)`` is what the CDE averages over: descriptions plus filled templates.

Modules: ``sets`` (config, description sets, templates), ``llm`` (Ollama), ``cache`` (answers
on disk), ``cleaning`` (answers to descriptions), ``files`` (import / export).
"""

from fiftyone_nola.core.descriptions.cache import cache_path, prompt_hash
from fiftyone_nola.core.descriptions.cleaning import (
    MINILM_NAME,
    clean_descriptions,
    clean_text,
    load_sentence_model,
    minilm_model_path,
    split_reply,
)
from fiftyone_nola.core.descriptions.files import (
    MAX_CLASS_FILE_BYTES,
    MAX_DESCRIPTIONS_BYTES,
    load_class_names,
    load_descriptions,
    save_descriptions,
)
from fiftyone_nola.core.descriptions.llm import NUM_PREDICT, generate_descriptions, resolve_host
from fiftyone_nola.core.descriptions.sets import (
    DESCRIPTION_QUESTIONS,
    SYSTEM_PROMPT,
    DescribeConfig,
    DescriptionSet,
    display_name,
    fill_templates,
    parse_class_names,
    template_descriptions,
)
from fiftyone_nola.core.descriptions.source import SOURCES, describe_classes
from fiftyone_nola.core.templates import CLIP_TEMPLATES, CLIP_TEMPLATES_7, SIMPLE_TEMPLATE

__all__ = [
    "SOURCES",
    "describe_classes",
    "CLIP_TEMPLATES",
    "CLIP_TEMPLATES_7",
    "DESCRIPTION_QUESTIONS",
    "MAX_CLASS_FILE_BYTES",
    "MAX_DESCRIPTIONS_BYTES",
    "MINILM_NAME",
    "NUM_PREDICT",
    "SIMPLE_TEMPLATE",
    "SYSTEM_PROMPT",
    "DescribeConfig",
    "DescriptionSet",
    "cache_path",
    "clean_descriptions",
    "clean_text",
    "display_name",
    "fill_templates",
    "generate_descriptions",
    "load_class_names",
    "load_descriptions",
    "load_sentence_model",
    "minilm_model_path",
    "parse_class_names",
    "prompt_hash",
    "resolve_host",
    "save_descriptions",
    "split_reply",
    "template_descriptions",
]
