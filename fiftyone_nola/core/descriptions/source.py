"""Where a class list's descriptions come from: a file, a local LLM, or CLIP's templates alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from fiftyone_nola.core.descriptions.files import load_descriptions
from fiftyone_nola.core.descriptions.llm import generate_descriptions
from fiftyone_nola.core.descriptions.sets import DescribeConfig, DescriptionSet, template_descriptions
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.progress import ProgressFn, null_progress

SOURCES = ("file", "llm", "templates")


def describe_classes(
    classes: Sequence[str],
    source: str = "templates",
    path: Optional[str] = None,
    llm: Optional[DescribeConfig] = None,
    progress: ProgressFn = null_progress,
) -> DescriptionSet:
    """The descriptions of ``classes`` from ``source``: ``file`` (the LaFTer/NoLA JSON at
    ``path``), ``llm`` (Ollama, cached; classes it cannot describe fall back to templates) or
    ``templates`` (CLIP's hand-written prompts only)."""
    if source == "file":
        if not path:
            raise InvalidInputError("A descriptions file is needed for source='file'")
        return load_descriptions(path, classes)
    if source == "llm":
        return generate_descriptions(classes, llm or DescribeConfig(), progress=progress)
    if source == "templates":
        return template_descriptions(classes)
    raise InvalidInputError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
