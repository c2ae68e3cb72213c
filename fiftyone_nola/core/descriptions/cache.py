"""The on-disk cache of raw LLM answers: one JSON file per (model, prompt set, class)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from fiftyone_nola.core.descriptions.sets import DESCRIPTION_QUESTIONS, SYSTEM_PROMPT, DescribeConfig
from fiftyone_nola.core.storage import descriptions_cache_dir, write_json_atomic

logger = logging.getLogger(__name__)


def prompt_hash(questions: Sequence[str] = DESCRIPTION_QUESTIONS) -> str:
    """Identity of the prompt set (questions + system prompt): part of the cache key."""
    blob = json.dumps({"system": SYSTEM_PROMPT, "questions": list(questions)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _slug(s: str, n: int = 40) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in s)[:n]


def cache_path(config: DescribeConfig, class_name: str) -> Path:
    """Cache file of one class: ``<cache>/<model>/<prompt hash>/<class slug>-<hash>.json``."""
    root = Path(config.cache_dir).expanduser() if config.cache_dir else descriptions_cache_dir()
    h = hashlib.sha256(class_name.encode()).hexdigest()[:10]
    return root / _slug(config.model, 80) / prompt_hash(config.questions) / f"{_slug(class_name)}-{h}.json"


def read_cache(path: Path, class_name: str, questions: Sequence[str], warnings: list[str]) -> dict:
    """Cached raw answers ``{question: [answer for seed 0, 1, ...]}``; a bad file is ignored."""
    if not path.exists():
        return {q: [] for q in questions}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("class") != class_name:
            raise ValueError(f"file is for class {data.get('class')!r}")
        answers = data["answers"]
        out = {}
        for q in questions:
            got = answers.get(q, [])
            if not isinstance(got, list) or not all(isinstance(a, str) for a in got):
                raise ValueError(f"answers for {q!r} are not a list of strings")
            out[q] = got
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        msg = f"Ignoring unreadable description cache {path} ({type(e).__name__}: {e}); asking again"
        logger.warning(msg)
        warnings.append(msg)
        return {q: [] for q in questions}


def write_cache(path: Path, class_name: str, config: DescribeConfig, answers: dict) -> None:
    write_json_atomic(
        path,
        {
            "class": class_name,
            "model": config.model,
            "prompt_hash": prompt_hash(config.questions),
            "system_prompt": SYSTEM_PROMPT,
            "answers": answers,
        },
    )
