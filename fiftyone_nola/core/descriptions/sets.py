"""What a description set is: the LLM questions and settings, descriptions per class, and the
CLIP templates that stand in for (or are added to) descriptions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

from fiftyone_nola.core.classes import normalize_class_name, parse_classes
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.templates import CLIP_TEMPLATES

# The LaFTer/NoLA questions (from CuPL), each asked ``answers_per_question`` times per class.
DESCRIPTION_QUESTIONS: tuple[str, ...] = (
    "Describe what a {c} looks like",
    "How can you identify a {c}?",
    "What does a {c} look like?",
    "Describe an image from the internet of a {c}",
    "A caption of an image of a {c}",
)

# Part of the prompt hash: changing it invalidates cached answers, as it changes them.
SYSTEM_PROMPT = (
    "You write short visual descriptions used to recognise objects in photos. "
    "Answer in one or two plain sentences, without lists, numbering, quotes or preamble."
)


@dataclass
class DescribeConfig:
    """How to ask the LLM and clean its answers. ``cache_dir`` defaults to ``$NOLA_HOME/descriptions``."""

    model: str = "llama3.2"
    host: Optional[str] = None  # else OLLAMA_HOST, else Ollama's default (127.0.0.1:11434)
    answers_per_question: int = 5
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_chars: int = 300
    near_duplicate_threshold: Optional[float] = 0.95  # MiniLM cosine; None disables
    use_llm: bool = True  # False: cached answers only, no requests
    cache_dir: Optional[str] = None
    temperature: float = 0.8
    questions: tuple[str, ...] = DESCRIPTION_QUESTIONS

    def validate(self) -> DescribeConfig:
        problems = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append("model must be a non-empty Ollama model name")
        if self.answers_per_question < 1:
            problems.append("answers_per_question must be >= 1")
        if self.timeout_s <= 0:
            problems.append("timeout_s must be > 0")
        if self.retries < 0:
            problems.append("retries must be >= 0")
        if self.backoff_s < 0:
            problems.append("backoff_s must be >= 0")
        if self.max_chars < 10:
            problems.append("max_chars must be >= 10")
        t = self.near_duplicate_threshold
        if t is not None and not 0.0 < t <= 1.0:
            problems.append("near_duplicate_threshold must be in (0, 1] or None")
        if not self.questions or any("{c}" not in q for q in self.questions):
            problems.append("questions must be non-empty and each contain '{c}'")
        if problems:
            raise InvalidInputError("Invalid DescribeConfig: " + "; ".join(problems))
        return self


@dataclass
class DescriptionSet:
    """Descriptions per class, where each class's came from, and warnings for the user."""

    descriptions: dict[str, list[str]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # "llm:<model>", "cache", "import:<file>", "templates"
    warnings: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return list(self.descriptions)

    def key_for(self, class_name: str) -> str:
        """The stored class name matching ``class_name`` (exact, else case/underscore-insensitive)."""
        if class_name in self.descriptions:
            return class_name
        norm = normalize_class_name(class_name)
        for k in self.descriptions:
            if normalize_class_name(k) == norm:
                return k
        raise InvalidInputError(f"No descriptions for class {class_name!r}; this set has: {preview(self.descriptions)}")

    def texts_for(
        self,
        class_name: str,
        templates: Sequence[str] = CLIP_TEMPLATES,
        include_templates: bool = True,
        max_descriptions: Optional[int] = None,
    ) -> list[str]:
        """Descriptions (the first ``max_descriptions`` if set) plus filled templates: what the
        CDE averages over. A text listed twice counts twice, as in the official code's average.

        A class whose descriptions are template stand-ins (source ``"templates"``) gets exactly
        ``templates``; templates are always added when a class has no descriptions.
        """
        key = self.key_for(class_name)
        texts = [] if self.source.get(key) == "templates" else list(self.descriptions[key])[:max_descriptions]
        if include_templates or not texts:
            texts += fill_templates(key, templates)
        if not texts:
            raise InvalidInputError(f"Class {class_name!r} has no descriptions and no templates were given")
        return texts

    def to_dict(self) -> dict[str, list[str]]:
        return {c: list(t) for c, t in self.descriptions.items()}


def preview(items, n: int = 8) -> str:
    """The first ``n`` items, quoted, and how many more there are."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def display_name(name: str) -> str:
    """The class name as put into prompts and templates: underscores read as spaces."""
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip()


def parse_class_names(text_or_list: Union[str, Sequence[str]]) -> list[str]:
    """Class names to describe: :func:`classes.parse_classes` accepting a single class."""
    return parse_classes(text_or_list, min_classes=1)


def fill_templates(class_name: str, templates: Sequence[str] = CLIP_TEMPLATES) -> list[str]:
    """Templates with ``{}`` replaced by the class's display name (not str.format: names may hold braces)."""
    name = display_name(class_name)
    return [t.replace("{}", name) for t in templates]


def template_descriptions(classes, templates: Sequence[str] = CLIP_TEMPLATES) -> DescriptionSet:
    """A DescriptionSet whose descriptions are the filled templates (source ``"templates"``)."""
    names = parse_class_names(classes)
    return DescriptionSet(
        descriptions={c: fill_templates(c, templates) for c in names}, source={c: "templates" for c in names}
    )
