"""CLIP tokenizers, including those that live on the Hugging Face hub rather than in open_clip.

OpenAI CLIP, EVA-02 and PE-Core use open_clip's own BPE (shipped with it: works offline).
SigLIP 2 (Gemma's sentencepiece, hub repo ``timm/ViT-B-16-SigLIP2``) and MetaCLIP 2 (XLM-V,
``facebook/xlm-v-base``) name a Hugging Face tokenizer in their open_clip config, fetched on first
use. Looked up in this order: ``<models_dir>/clip/<arch>/tokenizer/`` (the repo's tokenizer files,
copied there by hand for offline machines), then the Hugging Face cache / hub (``HF_HOME``;
``HF_HUB_OFFLINE=1`` reads the cache only). :func:`tokenizer_available` tells validation whether
either exists, before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fiftyone_nola.core.errors import ModelNotFoundError
from fiftyone_nola.core.models.specs import ClipSpec, hub_reachable, models_dir, safe_name

# Files a Hugging Face tokenizer folder may hold (any one makes the cache usable).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "sentencepiece.bpe.model")


def text_config(arch: str) -> dict:
    """The ``text_cfg`` of open_clip's config for ``arch`` ({} for ``hf-hub:`` names)."""
    if arch.startswith("hf-hub:"):
        return {}
    import open_clip

    from fiftyone_nola.core.models.towers import register_tiny_configs

    register_tiny_configs()
    return dict((open_clip.get_model_config(arch) or {}).get("text_cfg", {}))


def hf_tokenizer_name(arch: str) -> Optional[str]:
    """The Hugging Face tokenizer repo ``arch`` uses, or None (open_clip's own tokenizer)."""
    return text_config(arch).get("hf_tokenizer_name") or None


def tokenizer_dir(spec: ClipSpec) -> Path:
    """Where a hand-copied tokenizer of ``spec``'s architecture is looked for."""
    return models_dir(spec.models_dir) / "clip" / safe_name(spec.arch) / "tokenizer"


def _local(spec: ClipSpec) -> Optional[Path]:
    d = tokenizer_dir(spec)
    return d if any((d / f).is_file() for f in TOKENIZER_FILES) else None


def _cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in TOKENIZER_FILES)


def offline_hint_tokenizer(spec: ClipSpec, repo: str) -> str:
    """What to do when ``spec``'s Hugging Face tokenizer is neither local nor downloadable."""
    return (
        f"CLIP {spec.arch}'s tokenizer comes from the Hugging Face hub ({repo}) and is not available "
        f"offline. Copy the tokenizer files of https://huggingface.co/{repo} (tokenizer.json, "
        f"tokenizer_config.json, special_tokens_map.json and tokenizer.model / "
        f"sentencepiece.bpe.model when present) into {tokenizer_dir(spec)}, or run once online so "
        f"they land in the Hugging Face cache (HF_HOME)."
    )


def tokenizer_available(spec: ClipSpec) -> tuple[bool, str]:
    """``(True, "")`` if ``spec``'s tokenizer can be built here, else ``(False, what to put where)``."""
    repo = hf_tokenizer_name(spec.arch)
    if repo is None or _local(spec) is not None or _cached(repo):
        return True, ""
    return (True, "") if hub_reachable() else (False, offline_hint_tokenizer(spec, repo))


def build_tokenizer(spec: ClipSpec):
    """``spec``'s tokenizer: open_clip's for its architecture, from the local folder if present."""
    import open_clip

    repo = hf_tokenizer_name(spec.arch)
    if repo is None:
        return open_clip.get_tokenizer(spec.arch)
    ok, why = tokenizer_available(spec)
    if not ok:  # fail at once with what to do, not after the hub client's retries
        raise ModelNotFoundError(why)
    cfg = text_config(spec.arch)
    source = _local(spec) or repo
    try:
        return open_clip.tokenizer.HFTokenizer(
            str(source),
            context_length=cfg.get("context_length"),
            tokenizer_mode=cfg.get("tokenizer_mode"),
            **cfg.get("tokenizer_kwargs", {}),
        )
    except (OSError, ValueError) as e:  # transformers' "can't load tokenizer" / offline errors
        raise ModelNotFoundError(offline_hint_tokenizer(spec, repo) + f" ({type(e).__name__}: {e})") from e
