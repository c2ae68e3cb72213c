"""Descriptions written by a local LLM through Ollama, each answer cached as it arrives.

``ollama`` and ``httpx`` are imported when a client is made: a run that uses only cached
answers (or imported files) never loads them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from fiftyone_nola.core.descriptions.cache import cache_path, read_cache, write_cache
from fiftyone_nola.core.descriptions.cleaning import clean_descriptions, split_reply
from fiftyone_nola.core.descriptions.sets import (
    SYSTEM_PROMPT,
    DescribeConfig,
    DescriptionSet,
    display_name,
    fill_templates,
    parse_class_names,
    preview,
)
from fiftyone_nola.core.progress import ProgressFn, null_progress

logger = logging.getLogger(__name__)

NUM_PREDICT = 128  # tokens per answer: ~2 sentences; longer replies are cut at a sentence end anyway


class _LLMUnavailable(Exception):
    """The LLM gave no usable answer after all retries, or cannot answer at all."""


class _MalformedReply(ValueError):
    pass


def resolve_host(config: DescribeConfig) -> str:
    """The Ollama host: explicit, else ``OLLAMA_HOST``, else the client's default."""
    return config.host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"


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
        except Exception as e:  # closing a client that failed to connect must not hide the real error
            logger.debug("closing the Ollama client failed: %s", e)

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
                    messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
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


@dataclass
class _Run:
    """One ``generate_descriptions`` call: its client (made on first need), the failure that
    stopped asking, and the classes left without (or with part of) their LLM descriptions."""

    config: DescribeConfig
    progress: ProgressFn
    total: int
    result: DescriptionSet = field(default_factory=DescriptionSet)
    asker: Optional[_Asker] = None
    failure: Optional[str] = None
    without: list = field(default_factory=list)
    partial: list = field(default_factory=list)

    def ask(self, question: str, name: str, seed: int) -> Optional[str]:
        """An answer, or None once the LLM is off or has stopped answering."""
        if self.failure is not None or not self.config.use_llm:
            return None
        try:
            if self.asker is None:
                self.asker = _Asker(self.config)
            return self.asker.ask(question.replace("{c}", display_name(name)), seed=seed)
        except _LLMUnavailable as e:
            self.failure = str(e)
            return None

    def describe(self, name: str, done: int) -> None:
        """Fill ``name``'s missing answers, then its descriptions (or templates) into the result."""
        cfg = self.config
        path = cache_path(cfg, name)
        answers = read_cache(path, name, cfg.questions, self.result.warnings)
        cached = sum(min(len(a), cfg.answers_per_question) for a in answers.values())
        new = 0
        self.progress(done + cached, self.total, f"describing {name!r}")
        for q in cfg.questions:
            got = answers[q]
            while len(got) < cfg.answers_per_question:
                answer = self.ask(q, name, seed=len(got))
                if answer is None:
                    break
                got.append(answer)
                new += 1
                # write after every answer: a crash keeps everything obtained so far
                write_cache(path, name, cfg, answers)
                self.progress(done + cached + new, self.total, f"describing {name!r}")
        per_class = len(cfg.questions) * cfg.answers_per_question
        raw = [piece for q in cfg.questions for a in answers[q][: cfg.answers_per_question] for piece in split_reply(a)]
        descs = clean_descriptions(raw, name, cfg, self.result.warnings)
        if 0 < cached + new < per_class:
            self.partial.append(name)
        if descs:
            self.result.descriptions[name] = descs
            self.result.source[name] = f"llm:{cfg.model}" if new else "cache"
        else:
            self.without.append(name)
            self.result.descriptions[name] = fill_templates(name)
            self.result.source[name] = "templates"
        self.progress(done + per_class, self.total, f"described {name!r}")

    def warn_fallback(self) -> None:
        """One warning saying which classes lack LLM descriptions, why, and what to do."""
        config, failure = self.config, self.failure
        parts = []
        if failure is not None:
            parts.append(f"The LLM ({config.model} at {resolve_host(config)}) stopped answering: {failure}.")
        elif not config.use_llm:
            parts.append("LLM use is off (use_llm=False): only cached answers were used.")
        if self.without:
            parts.append(f"{len(self.without)} class(es) use CLIP template descriptions only: {preview(self.without)}.")
        if self.partial:
            parts.append(
                f"{len(self.partial)} class(es) have only part of their LLM descriptions: {preview(self.partial)}."
            )
        if failure is not None:
            parts.append(
                f"Start Ollama (`ollama serve`, `ollama pull {config.model}`) and re-run: answers "
                f"already obtained are cached and only missing ones are asked. Or pass a descriptions file."
            )
        msg = " ".join(parts)
        logger.warning(msg)
        self.result.warnings.append(msg)


def generate_descriptions(
    classes, config: Optional[DescribeConfig] = None, progress: Optional[ProgressFn] = None
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
    run = _Run(config, progress or null_progress, len(names) * per_class)
    try:
        for i, name in enumerate(names):
            run.describe(name, i * per_class)
    finally:
        if run.asker is not None:
            run.asker.close()
    if run.without or run.partial:
        run.warn_fallback()
    return run.result
