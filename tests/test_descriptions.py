"""Class descriptions: LLM generation against a loopback Ollama stand-in, caching, fallback,
import/export of the LaFTer/NoLA JSON format, class-name parsing and description cleaning."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The MiniLM weights come from an installed package; never let a hub lookup wait on a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ollama_standin import OllamaStandin, answer_text, closed_port  # noqa: E402

from conftest import CIFAR10_DESCRIPTIONS  # noqa: E402
from fiftyone_nola.core import descriptions as dsc  # noqa: E402
from fiftyone_nola.core.errors import InvalidInputError  # noqa: E402

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_Q = len(dsc.DESCRIPTION_QUESTIONS)


@pytest.fixture
def standin():
    server = OllamaStandin().start()
    yield server
    server.stop()


def cfg(tmp_path, host, **kw):
    """A fast config: tiny backoff, short timeout, own cache dir, no MiniLM unless asked."""
    base = dict(
        host=host,
        cache_dir=str(tmp_path / "cache"),
        answers_per_question=2,
        timeout_s=2.0,
        retries=2,
        backoff_s=0.01,
        near_duplicate_threshold=None,
    )
    base.update(kw)
    return dsc.DescribeConfig(**base)


def warning_records(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(dsc.__name__)]


# --------------------------------------------------------------------------- the stand-in itself


def test_standin_shuts_down():
    server = OllamaStandin().start()
    port = int(server.host.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --------------------------------------------------------------------------- generation


def test_generate_asks_each_question_and_cleans(tmp_path, standin):
    calls = []
    config = cfg(tmp_path, standin.host, model="llama-test")
    res = dsc.generate_descriptions(["cat", "sea_lion"], config, progress=lambda d, t, m: calls.append((d, t)))
    assert standin.count == 2 * N_Q * 2
    bodies = [r["body"] for r in standin.requests]
    assert {b["model"] for b in bodies} == {"llama-test"}
    assert all(b["stream"] is False for b in bodies)
    users = [b["messages"][-1]["content"] for b in bodies]
    assert users.count("How can you identify a sea lion?") == 2  # underscores read as spaces
    assert {b["options"]["seed"] for b in bodies} == {0, 1}
    assert res.source == {"cat": "llm:llama-test", "sea_lion": "llm:llama-test"}
    assert res.warnings == []
    for c, name in (("cat", "cat"), ("sea_lion", "sea lion")):
        descs = res.descriptions[c]
        assert len(descs) == N_Q * 2  # every stand-in answer is distinct
        for t in descs:
            assert name in t
            assert not t.startswith(("1.", '"', "-", " ")) and not t.endswith('"')
        # the numbered/quoted reply for seed 1 comes back bare
        q = dsc.DESCRIPTION_QUESTIONS[1].replace("{c}", name)
        assert answer_text(q, 1).startswith('1. "')
        assert answer_text(q, 1)[4:-1] in descs
    assert calls[-1] == (2 * N_Q * 2, 2 * N_Q * 2)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    texts = res.texts_for("sea_lion")
    assert texts[: len(res.descriptions["sea_lion"])] == res.descriptions["sea_lion"]
    assert "a photo of a sea lion." in texts and len(texts) == N_Q * 2 + 80


def test_second_run_is_served_from_cache(tmp_path, standin):
    config = cfg(tmp_path, standin.host)
    first = dsc.generate_descriptions(["cat", "dog"], config)
    asked = standin.count
    second = dsc.generate_descriptions(["dog", "cat"], config)
    assert standin.count == asked  # nothing asked twice
    assert second.source == {"cat": "cache", "dog": "cache"}
    assert second.descriptions == first.descriptions
    # more answers per question: only the missing ones are asked
    dsc.generate_descriptions(["cat"], cfg(tmp_path, standin.host, answers_per_question=3))
    assert standin.count == asked + N_Q
    # another model or prompt set is another cache entry
    dsc.generate_descriptions(["cat"], cfg(tmp_path, standin.host, model="other"))
    assert standin.count == asked + N_Q + 2 * N_Q
    files = sorted(p.relative_to(tmp_path / "cache").parts[0] for p in (tmp_path / "cache").rglob("*.json"))
    assert files == ["llama3.2", "llama3.2", "other"]


def test_failure_mid_run_keeps_partial_cache(tmp_path, standin, caplog):
    standin.ok_budget, standin.exhausted_mode = 7, "error500"
    config = cfg(tmp_path, standin.host, retries=1)
    with caplog.at_level(logging.INFO, logger=dsc.__name__):
        res = dsc.generate_descriptions(["cat", "dog"], config)
    assert standin.count == 7 + 2  # the failing request and its one retry; then nothing more
    assert res.source == {"cat": "llm:llama3.2", "dog": "templates"}
    assert len(res.descriptions["cat"]) == 7
    assert res.descriptions["dog"] == dsc.fill_templates("dog")
    assert len(res.warnings) == 1 and len(warning_records(caplog)) == 1
    assert "'dog'" in res.warnings[0] and "part of their LLM descriptions: 'cat'" in res.warnings[0]
    cached = json.loads(dsc.cache_path(config, "cat").read_text())
    assert sum(len(a) for a in cached["answers"].values()) == 7
    assert not dsc.cache_path(config, "dog").exists()

    standin.ok_budget = None
    before = standin.count
    res2 = dsc.generate_descriptions(["cat", "dog"], config)
    assert standin.count - before == 2 * N_Q * 2 - 7
    assert res2.source == {"cat": "llm:llama3.2", "dog": "llm:llama3.2"} and res2.warnings == []
    assert res2.descriptions["cat"][:7] == res.descriptions["cat"]


def test_crash_mid_run_keeps_answers_obtained(tmp_path, standin):
    class Crash(Exception):
        pass

    def progress(done, total, message):
        if done == 5:
            raise Crash

    config = cfg(tmp_path, standin.host)
    with pytest.raises(Crash):
        dsc.generate_descriptions(["cat"], config, progress=progress)
    assert standin.count == 5
    cached = json.loads(dsc.cache_path(config, "cat").read_text())
    assert sum(len(a) for a in cached["answers"].values()) == 5
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    dsc.generate_descriptions(["cat"], config)
    assert standin.count == N_Q * 2


def test_timeouts_retry_then_fall_back_to_templates(tmp_path, caplog):
    with OllamaStandin(mode="slow", delay_s=5.0) as server:
        config = cfg(tmp_path, server.host, timeout_s=0.3, retries=2)
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger=dsc.__name__):
            res = dsc.generate_descriptions(["cat", "dog", "frog"], config)
        elapsed = time.monotonic() - t0
        assert server.count == 3  # one request and two retries; the other classes ask nothing
    assert elapsed < 4.5  # had it waited for the reply, 5 s
    assert set(res.source.values()) == {"templates"}
    assert res.texts_for("frog") == dsc.fill_templates("frog")
    assert len(res.warnings) == 1 and len(warning_records(caplog)) == 1
    assert "no answer within 0.3 s" in res.warnings[0] and "3 attempt(s)" in res.warnings[0]
    assert "'cat', 'dog', 'frog'" in res.warnings[0]
    retries = [r for r in caplog.records if "attempt" in r.getMessage() and r.levelno == logging.INFO]
    assert len(retries) == 3


def test_malformed_replies_are_retried(tmp_path, standin):
    standin.script = ["malformed", "no_message", "empty", "error500"]
    res = dsc.generate_descriptions(["cat"], cfg(tmp_path, standin.host, retries=4))
    assert standin.count == 4 + N_Q * 2
    assert res.source == {"cat": "llm:llama3.2"} and res.warnings == []
    assert len(res.descriptions["cat"]) == N_Q * 2


@pytest.mark.parametrize(
    "mode, words", [("malformed", "malformed reply"), ("empty", "empty answer"), ("error500", "server error")]
)
def test_persistently_bad_replies_fall_back(tmp_path, standin, mode, words):
    standin.mode = mode
    res = dsc.generate_descriptions(["cat", "dog"], cfg(tmp_path, standin.host, retries=1))
    assert standin.count == 2
    assert res.source == {"cat": "templates", "dog": "templates"}
    assert len(res.warnings) == 1 and words in res.warnings[0]


def test_missing_model_is_not_retried(tmp_path, standin):
    standin.mode = "missing_model"
    res = dsc.generate_descriptions(["cat"], cfg(tmp_path, standin.host, model="nope", retries=3))
    assert standin.count == 1
    assert res.source == {"cat": "templates"}
    assert "ollama pull nope" in res.warnings[0]


def test_server_down_falls_back_quickly(tmp_path, caplog):
    host = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=dsc.__name__):
        res = dsc.generate_descriptions(CIFAR_CLASSES, cfg(tmp_path, host, answers_per_question=5, timeout_s=5.0))
    assert time.monotonic() - t0 < 3.0  # refused at once: no waiting on the 5 s timeout
    assert set(res.source.values()) == {"templates"} and list(res.source) == CIFAR_CLASSES
    assert len(res.warnings) == 1 and len(warning_records(caplog)) == 1
    assert "connection refused" in res.warnings[0] and host in res.warnings[0]
    assert all(len(res.texts_for(c)) == 80 for c in CIFAR_CLASSES)


def test_ollama_host_env_is_used(tmp_path, standin, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", standin.host)
    res = dsc.generate_descriptions(["cat"], cfg(tmp_path, None, answers_per_question=1))
    assert standin.count == N_Q and res.source == {"cat": "llm:llama3.2"}


def test_use_llm_off_reads_cache_only(tmp_path, standin):
    config = cfg(tmp_path, standin.host)
    dsc.generate_descriptions(["cat"], config)
    asked = standin.count
    off = cfg(tmp_path, standin.host, use_llm=False)
    res = dsc.generate_descriptions(["cat", "dog"], off)
    assert standin.count == asked
    assert res.source == {"cat": "cache", "dog": "templates"}
    assert len(res.warnings) == 1 and "use_llm=False" in res.warnings[0]


def test_corrupt_cache_is_ignored_and_refilled(tmp_path, standin):
    config = cfg(tmp_path, standin.host)
    path = dsc.cache_path(config, "cat")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    res = dsc.generate_descriptions(["cat"], config)
    assert standin.count == N_Q * 2 and res.source == {"cat": "llm:llama3.2"}
    assert any("unreadable description cache" in w for w in res.warnings)
    assert json.loads(path.read_text())["class"] == "cat"


def test_unusable_host_falls_back(tmp_path):
    res = dsc.generate_descriptions(["cat"], cfg(tmp_path, "http://[::1"))
    assert res.source == {"cat": "templates"} and len(res.warnings) == 1


def test_config_is_validated(tmp_path):
    for bad in (
        dict(answers_per_question=0),
        dict(timeout_s=0),
        dict(retries=-1),
        dict(near_duplicate_threshold=1.5),
        dict(questions=("no placeholder",)),
        dict(model=" "),
    ):
        with pytest.raises(InvalidInputError):
            dsc.generate_descriptions(["cat"], dsc.DescribeConfig(**bad))
    with pytest.raises(InvalidInputError, match="Duplicate"):
        dsc.generate_descriptions(["cat", "Cat"], cfg(tmp_path, "http://127.0.0.1:9"))


# --------------------------------------------------------------------------- templates


def test_templates():
    assert len(dsc.CLIP_TEMPLATES) == 80 == len(set(dsc.CLIP_TEMPLATES))
    assert all(t.count("{}") == 1 for t in dsc.CLIP_TEMPLATES)
    assert set(dsc.CLIP_TEMPLATES_7) <= set(dsc.CLIP_TEMPLATES)
    assert dsc.SIMPLE_TEMPLATE in dsc.CLIP_TEMPLATES
    assert len(dsc.DESCRIPTION_QUESTIONS) == 5 and all("{c}" in q for q in dsc.DESCRIPTION_QUESTIONS)
    res = dsc.template_descriptions(["cat", "sea_lion", "{weird}"], templates=[dsc.SIMPLE_TEMPLATE])
    assert res.descriptions == {
        "cat": ["a photo of a cat."],
        "sea_lion": ["a photo of a sea lion."],
        "{weird}": ["a photo of a {weird}."],
    }
    assert res.source == {c: "templates" for c in res.descriptions}
    assert res.texts_for("Sea Lion", templates=[dsc.SIMPLE_TEMPLATE]) == ["a photo of a sea lion."]
    with pytest.raises(InvalidInputError, match="No descriptions for class 'dog'"):
        res.texts_for("dog")


def test_texts_for_with_and_without_templates():
    ds = dsc.DescriptionSet({"cat": ["A cat.", "a photo of a cat."]}, {"cat": "import:x"})
    assert ds.texts_for("cat", include_templates=False) == ["A cat.", "a photo of a cat."]
    both = ds.texts_for("cat", templates=[dsc.SIMPLE_TEMPLATE, "itap of a {}."])
    # The official CDE averages every listed text: a repeated one weighs twice.
    assert both == ["A cat.", "a photo of a cat.", "a photo of a cat.", "itap of a cat."]


def test_cifar10_texts_are_the_official_ones(tmp_path):
    """On the official CIFAR10_local file the CDE averages its 50 descriptions per class (repeats
    included) and the official CIFAR-10 set of 18 templates, which ``auto`` picks."""
    from fiftyone_nola.core.templates import resolve_templates

    res = dsc.load_descriptions(CIFAR10_DESCRIPTIONS, CIFAR_CLASSES)
    name, templates = resolve_templates("auto", CIFAR_CLASSES)
    assert name == "cifar10" and len(templates) == 18
    raw = json.loads(CIFAR10_DESCRIPTIONS.read_text())
    for c in CIFAR_CLASSES:
        texts = res.texts_for(c, templates=templates)
        # Stripped: CLIP's tokenizer strips white space itself, so the tokens are the same.
        assert texts == [t.strip() for t in raw[c]] + [t.format(c) for t in templates]
    assert len(res.texts_for("bird", templates=templates)) == 68  # 50 (41 distinct) + 18


# --------------------------------------------------------------------------- import / export


def test_load_real_cifar_descriptions():
    path = CIFAR10_DESCRIPTIONS
    res = dsc.load_descriptions(path, CIFAR_CLASSES)
    assert list(res.descriptions) == CIFAR_CLASSES
    assert set(res.source.values()) == {f"import:{path}"}
    assert res.warnings == []
    raw = json.loads(path.read_text())
    for c in CIFAR_CLASSES:
        assert res.descriptions[c] == [t.strip() for t in raw[c] if t.strip()]
        assert len(res.descriptions[c]) >= 40
        texts = res.texts_for(c)
        assert len(texts) > len(res.descriptions[c]) and f"a photo of a {c}." in texts
    # tolerant matching, result keyed by the names asked for
    res2 = dsc.load_descriptions(path, ["Airplane", "CAT"])
    assert list(res2.descriptions) == ["Airplane", "CAT"]
    assert res2.descriptions["CAT"] == res.descriptions["cat"]


def write(tmp_path, content, name="d.json"):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"cat": ["a"', "not valid JSON"),
        ("", "not valid JSON"),
        ('["cat", "dog"]', "must be a JSON object"),
        ('{"cat": "a cat"}', "list of description strings"),
        ('{"cat": ["ok", 3]}', "list of description strings"),
        ('{"cat": {"a": 1}}', "list of description strings"),
        ('{"": ["x"]}', "non-empty strings"),
        ('{"cat": ["a"], "cat": ["b"]}', "appears twice"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (b'{"caf\xe9": ["x"]}', "not UTF-8"),
    ],
)
def test_bad_description_files_are_rejected(tmp_path, content, message):
    with pytest.raises(InvalidInputError, match=message):
        dsc.load_descriptions(write(tmp_path, content))


def test_huge_and_missing_description_files_are_rejected(tmp_path):
    p = tmp_path / "huge.json"
    with open(p, "wb") as f:  # sparse: costs no disk, must be refused before being read
        f.truncate(dsc.MAX_DESCRIPTIONS_BYTES + 1)
    with pytest.raises(InvalidInputError, match="over the 50 MB limit"):
        dsc.load_descriptions(p)
    with pytest.raises(InvalidInputError, match="does not exist"):
        dsc.load_descriptions(tmp_path / "nope.json")
    with pytest.raises(InvalidInputError, match="holds no classes"):
        dsc.load_descriptions(write(tmp_path, "{}"))


def test_missing_classes_filled_extra_ignored(tmp_path, caplog):
    p = write(
        tmp_path, {"Sea_Lion": ["A sea lion on a rock.", "  "], "cat": [" A cat. "], "zebra": ["stripes"], "dog": []}
    )
    with caplog.at_level(logging.WARNING, logger=dsc.__name__):
        res = dsc.load_descriptions(p, "sea lion, cat, dog, bird")
    assert list(res.descriptions) == ["sea lion", "cat", "dog", "bird"]
    assert res.descriptions["sea lion"] == ["A sea lion on a rock."]
    assert res.descriptions["cat"] == ["A cat."]
    assert res.descriptions["dog"] == dsc.fill_templates("dog")
    assert res.source == {"sea lion": f"import:{p}", "cat": f"import:{p}", "dog": "templates", "bird": "templates"}
    assert len(res.warnings) == 1 and "'dog', 'bird'" in res.warnings[0]
    assert len(warning_records(caplog)) == 1
    amb = write(tmp_path, {"sea_lion": ["a"], "sea lion": ["b"]}, "amb.json")
    with pytest.raises(InvalidInputError, match="several entries"):
        dsc.load_descriptions(amb, ["sea lion"])


def test_save_load_round_trip(tmp_path):
    table = {
        "café": ["Un café noir.", 'A "quoted" cup.'],
        "AC/DC": ["A band / logo."],
        "zebra": ["Stripes.\nMore stripes."],
        "ant": ["Six legs."],
    }
    p = dsc.save_descriptions(table, tmp_path / "sub" / "out.json")
    assert dsc.load_descriptions(p).descriptions == table
    assert list(json.loads(p.read_text(encoding="utf-8"))) == list(table)  # order kept
    ds = dsc.load_descriptions(p, ["ant", "zebra"])
    p2 = dsc.save_descriptions(ds, tmp_path / "out2.json")
    assert json.loads(p2.read_text(encoding="utf-8")) == {"ant": table["ant"], "zebra": table["zebra"]}
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["out.json", "out2.json", "sub"]
    with pytest.raises(InvalidInputError):
        dsc.save_descriptions({"cat": "not a list"}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


# --------------------------------------------------------------------------- class names


def test_parse_class_names_forms():
    assert dsc.parse_class_names("cat, dog ,bird") == ["cat", "dog", "bird"]
    assert dsc.parse_class_names("# animals\ncat\n\nWashington, D.C.\n") == ["cat", "Washington, D.C."]
    assert dsc.parse_class_names([" cat ", "dog"]) == ["cat", "dog"]
    odd = ["café", "naïve/über", "AC/DC", '"teddy bear"', "it's", "日本の猫", "t-shirt", "{x}"]
    assert dsc.parse_class_names(odd) == odd
    assert dsc.parse_class_names(", ".join(odd)) == odd
    assert dsc.parse_class_names("solo") == ["solo"]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("", "No class names"),
        ("# only a comment\n", "No class names"),
        ([], "No class names"),
        ("cat,,dog", r"position\(s\) \[2\]"),
        ("cat, dog,", r"position\(s\) \[3\]"),
        (["cat", "  "], "Empty class name"),
        (["cat", 3], "must be strings"),
        (42, "must be a list"),
        ("cat, dog, Cat, bird, dog", "'cat' = 'Cat'; 'dog' = 'dog'"),
        (["sea_lion", "Sea Lion"], "'sea_lion' = 'Sea Lion'"),
    ],
)
def test_parse_class_names_rejects(arg, message):
    with pytest.raises(InvalidInputError, match=message):
        dsc.parse_class_names(arg)


def test_load_class_names(tmp_path):
    p = write(tmp_path, "# CIFAR\nairplane\n  automobile  \n# skip me\nbird\n", "classes.txt")
    assert dsc.load_class_names(p) == ["airplane", "automobile", "bird"]
    assert dsc.load_class_names(write(tmp_path, "\ufeffa, b, c\n", "c.txt")) == ["a", "b", "c"]
    with pytest.raises(InvalidInputError, match="does not exist"):
        dsc.load_class_names(tmp_path / "none.txt")
    with pytest.raises(InvalidInputError, match="dup.txt.*Duplicate"):
        dsc.load_class_names(write(tmp_path, "a\nb\na\n", "dup.txt"))
    with pytest.raises(InvalidInputError, match="binary"):
        dsc.load_class_names(write(tmp_path, b"a\x00b", "bin.txt"))


# --------------------------------------------------------------------------- cleaning


def test_clean_descriptions_rules():
    config = dsc.DescribeConfig(max_chars=60, near_duplicate_threshold=None)
    long_two = "A cat is small and furry. It has whiskers and a long tail that sways."
    texts = [
        '1. "A cat has whiskers."',
        "- A cat purrs.",
        "* **A cat sleeps.**",
        "  ",
        "",
        "Caption: A cat on a sofa.",
        "a cat has whiskers",
        "A CAT PURRS.",
        "(2) ‘A cat hunts.’",
        long_two,
        "x" * 61,
        "...",
        42,
    ]
    assert dsc.clean_descriptions(texts, "cat", config) == [
        "A cat has whiskers.",
        "A cat purrs.",
        "A cat sleeps.",
        "A cat on a sofa.",
        "A cat hunts.",
        "A cat is small and furry.",
    ]
    assert dsc.clean_text("3.5 kg is what a cat weighs.") == "3.5 kg is what a cat weighs."
    assert dsc.clean_text('"Fur" and "claws"') == '"Fur" and "claws"'  # not one quoted text
    assert dsc.clean_text("'A cat's tail.'") == "A cat's tail."
    assert dsc.clean_text("A. " + "b" * 80, max_chars=60) is None  # a stub is not kept
    assert dsc.split_reply("Here are some ways:\n1. Fur.\n2. Whiskers.") == ["1. Fur.", "2. Whiskers."]


_text = st.text(alphabet=st.sampled_from(list("ab .!?\"'*-1)\n\t“”é_")), max_size=80)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(st.one_of(_text, st.text(max_size=40)), max_size=12),
    max_chars=st.integers(min_value=10, max_value=60),
)
def test_clean_descriptions_invariants(texts, max_chars):
    config = dsc.DescribeConfig(max_chars=max_chars, near_duplicate_threshold=None)
    out = dsc.clean_descriptions(texts, "x", config)
    cleaned = {dsc.clean_text(t, max_chars) for t in texts}
    assert set(out) <= cleaned  # output is cleaned input, nothing invented
    assert len({t.casefold() for t in out}) == len(out)  # no duplicates
    assert all(0 < len(t) <= max_chars and t == t.strip() for t in out)
    assert dsc.clean_descriptions(out, "x", config) == out  # idempotent


# --------------------------------------------------------------------------- MiniLM near-duplicates


@pytest.fixture(scope="module")
def minilm():
    path = dsc.minilm_model_path()
    model = dsc.load_sentence_model()
    if model is None:
        pytest.skip(f"MiniLM could not load offline from {path}: {dsc.cleaning._minilm.get('error')}")
    return model


def test_minilm_is_found_locally(minilm):
    path = dsc.minilm_model_path()
    assert path is not None and (path / "model.safetensors").is_file()
    assert minilm.encode(["a cat"]).shape == (1, 384)


def test_near_duplicates_removed_with_minilm(minilm, tmp_path, standin):
    texts = [
        "A cat is a small furry animal.",
        "A cat is a small, furry animal",
        "A truck has six big wheels.",
        "Trucks carry heavy loads on highways.",
    ]
    config = dsc.DescribeConfig(near_duplicate_threshold=0.95)
    assert dsc.clean_descriptions(texts, "cat", config) == [texts[0], texts[2], texts[3]]
    strict = dsc.DescribeConfig(near_duplicate_threshold=0.999)
    assert dsc.clean_descriptions(texts, "cat", strict) == [texts[0], texts[1].strip(), texts[2], texts[3]]
    loose = dsc.DescribeConfig(near_duplicate_threshold=0.3)
    assert len(dsc.clean_descriptions(texts, "cat", loose)) == 2
    # in generation: the two answers to each question differ by a comma only
    standin.mode = "repetitive"
    res = dsc.generate_descriptions(["cat"], cfg(tmp_path, standin.host, near_duplicate_threshold=0.95))
    assert standin.count == N_Q * 2
    assert 0 < len(res.descriptions["cat"]) <= N_Q and res.warnings == []
    assert all("," not in t for t in res.descriptions["cat"])  # the first of each pair is kept
    off = dsc.generate_descriptions(["cat"], cfg(tmp_path, standin.host))
    assert standin.count == N_Q * 2 and off.source == {"cat": "cache"}
    assert len(off.descriptions["cat"]) == N_Q * 2  # no filtering when the threshold is None


def test_minilm_unavailable_skips_with_warning(monkeypatch, caplog):
    monkeypatch.setattr(dsc.cleaning, "_minilm", {})
    monkeypatch.setenv("NOLA_MINILM_PATH", "/nonexistent/minilm")
    warnings: list[str] = []
    texts = ["A cat is a small furry animal.", "A cat is a small, furry animal", "a cat is a small furry animal"]
    with caplog.at_level(logging.WARNING, logger=dsc.__name__):
        out = dsc.clean_descriptions(texts, "cat", dsc.DescribeConfig(), warnings)
        dsc.clean_descriptions(texts, "cat", dsc.DescribeConfig(), warnings)
    assert out == texts[:2]  # exact duplicates still go
    assert len(warnings) == 1 and "Near-duplicate filtering" in warnings[0]
    assert len(warning_records(caplog)) == 1  # logged once per process, not per call


def test_texts_for_caps_descriptions_and_can_drop_templates():
    from fiftyone_nola.core.descriptions import CLIP_TEMPLATES, DescriptionSet

    ds = DescriptionSet(descriptions={"cat": ["a small pet", "whiskers", "purrs"]}, source={"cat": "x"}, warnings=[])
    assert ds.texts_for("cat", include_templates=False, max_descriptions=2) == ["a small pet", "whiskers"]
    assert len(ds.texts_for("cat", max_descriptions=1)) == 1 + len(CLIP_TEMPLATES)
