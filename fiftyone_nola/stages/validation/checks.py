"""Checks of single inputs; each returns Problem items instead of raising."""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from fiftyone_nola.core import engines
from fiftyone_nola.core import models as nm
from fiftyone_nola.core.classes import parse_classes, resolve_classes
from fiftyone_nola.core.config import bounds
from fiftyone_nola.core.descriptions import load_descriptions
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.errors import InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.models import _CONFIG_DIR, _TINY_TIMM, concrete_dino, weights_available
from fiftyone_nola.core.templates import resolve_templates
from fiftyone_nola.stages import runs
from fiftyone_nola.stages.fo_io import label_path
from fiftyone_nola.stages.validation.report import _human, _problem


def check_classes(
    classes, samples=None, min_classes: int = 2, input_name: str = "classes"
) -> tuple[Optional[list], list]:
    """``(class list or None, problems)``: count, duplicates, empties, a missing classes file."""

    if isinstance(classes, str) and classes.strip() and "\n" not in classes and "," not in classes:
        p = Path(classes).expanduser()
        if (os.sep in classes or p.suffix.lower() in {".txt", ".csv", ".json"}) and not p.is_file():
            return None, [
                _problem(
                    input_name,
                    f"classes file {p} does not exist",
                    "give the path of a text file with one class name per line, or comma-separated names",
                )
            ]
    try:
        names = resolve_classes(classes, samples)
        if min_classes != 2:
            names = parse_classes(names, min_classes=min_classes)
        return names, []
    except InvalidInputError as e:
        return None, [
            _problem(input_name, str(e), f"fix the class list (at least {min_classes} distinct, non-empty names)")
        ]
    except OSError as e:
        return None, [_problem(input_name, f"cannot read the classes file: {e}", "check the path")]


def check_descriptions(
    path: Optional[str],
    classes: Optional[Sequence[str]],
    allow_template_fallback: bool,
    input_name: str = "descriptions_file",
) -> list:
    """Readable, parseable, and covering every class (or fallback to templates explicitly allowed)."""
    if not path:
        return []

    try:
        ds = load_descriptions(path, classes)
    except InvalidInputError as e:
        return [_problem(input_name, str(e), 'fix the file: JSON {"class name": ["description", ...]}')]
    except OSError as e:
        return [_problem(input_name, f"cannot read {path}: {e}", "check the path and its permissions")]
    if classes is None:
        return []
    missing = [c for c in classes if ds.source.get(c) == "templates"]
    if not missing:
        return []
    shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
    covered = len(classes) - len(missing)
    msg = f"the descriptions file {path} covers {covered} of {len(classes)} classes; it lacks {len(missing)}: {shown}"
    if allow_template_fallback:
        return [_problem(input_name, msg + " (CLIP templates used for them, as allowed)", error=False)]
    return [
        _problem(
            input_name,
            msg,
            "add descriptions for them to the file, or allow CLIP template "
            "descriptions for the missing classes (allow_template_fallback / "
            "--allow-template-fallback)",
        )
    ]


def check_templates(templates, classes: Optional[Sequence[str]], input_name: str = "templates") -> list:
    """A template preset name, ``auto``, a readable template file or a list (``templates.py``)."""
    if templates is None:
        return []
    try:
        resolve_templates(templates, classes or ())
    except InvalidInputError as e:
        return [_problem(input_name, str(e), "name a preset, auto, or a file of templates with one {} each")]
    except OSError as e:
        return [_problem(input_name, f"cannot read the template file: {e}", "check the path")]
    return []


def _gt_labels(samples, field_: str, doc_type) -> set:
    return {x for x in samples.distinct(label_path(field_, doc_type)) if x is not None}


def check_gt_field(
    samples,
    field_: Optional[str],
    classes: Optional[Sequence[str]],
    multilabel: bool = False,
    outputs: Sequence[str] = (),
    input_name: str = "gt_field",
    labels: Optional[set] = None,
) -> list:
    """Ground truth: exists, a label type evaluation understands, and which labels are unknown.

    ``labels``: the GT labels when the field does not exist yet (``--gt-from-subfolders``).
    """
    if not field_:
        return []
    out = []
    if field_ in outputs:
        why = f"ground-truth field {field_!r} is also an output field of this job: it would be overwritten"
        out.append(_problem(input_name, why, "use another output field name"))
    if labels is None:
        if samples is None:
            return out
        problem, labels = _gt_field_labels(samples, field_, multilabel, input_name)
        if problem:
            return out + [problem]
    return out + _gt_outside_classes(field_, labels, classes, input_name)


def _gt_field_labels(samples, field_: str, multilabel: bool, input_name: str):
    """``(problem, None)`` if ``field_`` is missing or of a type evaluation cannot read, else
    ``(None, its labels)``."""
    import fiftyone as fo

    schema = samples.get_field_schema(flat=True)
    if field_ not in schema:
        label_fields = sorted(k for k, v in schema.items() if "." not in k and _is_label(v))
        why = f"field {field_!r} does not exist on dataset '{_root(samples).name}'"
        fix = f"use one of its label fields ({', '.join(label_fields) or 'none'}) or leave it empty (no evaluation)"
        return _problem(input_name, why, fix), None
    doc_type = getattr(schema[field_], "document_type", None)
    ok_types = (fo.Classification, fo.Classifications, fo.Detections) if multilabel else (fo.Classification,)
    if doc_type is None or not issubclass(doc_type, ok_types):
        got = getattr(doc_type, "__name__", type(schema[field_]).__name__)
        want = "/".join(t.__name__ for t in ok_types)
        why = f"field {field_!r} holds {got}; evaluation needs {want}"
        return _problem(input_name, why, "name a field of that label type"), None
    return None, _gt_labels(samples, field_, doc_type)


def _gt_outside_classes(field_: str, labels, classes, input_name: str) -> list:
    """A problem when no ground-truth label is a class; a warning when some are not."""
    if classes is None or not labels:
        return []
    outside = sorted(labels - set(classes))
    if outside and len(outside) == len(labels):
        why = f"none of the labels in {field_!r} is in the class list (it has {_preview(sorted(labels))})"
        return [_problem(input_name, why, "check the class names against the ground truth's")]
    if outside:
        why = f"{len(outside)} label(s) in {field_!r} are outside the class list: {_preview(outside)}"
        return [_problem(input_name, why + "; those samples count as errors", error=False)]
    return []


def _is_label(ftype) -> bool:
    import fiftyone as fo

    doc = getattr(ftype, "document_type", None)
    return doc is not None and issubclass(doc, fo.Label)


def _preview(items, n: int = 8) -> str:
    items = list(items)
    return ", ".join(repr(x) for x in items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


@functools.lru_cache(maxsize=1)
def _clip_archs() -> frozenset:
    """open_clip's architectures, from its config files when it is not imported yet (importing
    it costs seconds), plus this library's tiny test model."""
    import importlib.util
    import sys

    names = {p.stem for p in _CONFIG_DIR.glob("*.json")}
    if "open_clip" in sys.modules:
        return frozenset(names | set(sys.modules["open_clip"].list_models()))
    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        names |= {p.stem for p in (Path(loc) / "model_configs").glob("*.json")}
    return frozenset(names)


_WEIGHTS_CACHE: dict = {}


def _weights(spec) -> tuple[bool, str]:
    """``models.weights_available`` memoised for a minute (it may probe the hub)."""

    key = (type(spec).__name__, repr(spec), os.environ.get("NOLA_MODELS_DIR"))
    hit = _WEIGHTS_CACHE.get(key)
    if hit and time.monotonic() - hit[0] < 60:
        return hit[1]
    res = weights_available(spec)
    _WEIGHTS_CACHE[key] = (time.monotonic(), res)
    return res


def check_clip(spec, fallback_random_init=False, names=("clip_arch", "clip_pretrained"), text=True, prompts=False):
    """Architecture known to open_clip; weights present, downloadable, or random init asked; with
    ``text`` its tokenizer can be built here (SigLIP 2 / MetaCLIP 2 use a Hugging Face one); with
    ``prompts`` its vision tower can take prompt tuning's visual prompts. A list of problems."""
    arch_in, weights_in = names
    if spec is None:
        return []
    if not spec.arch.startswith("hf-hub:") and spec.arch not in _clip_archs():
        near = sorted(a for a in _clip_archs() if a.lower()[:5] == spec.arch.lower()[:5])[:8]
        return [
            _problem(
                arch_in,
                f"unknown CLIP architecture {spec.arch!r}",
                f"use an open_clip architecture, e.g. {', '.join(near) or 'ViT-B-32, ViT-B-16, ViT-L-14'}",
            )
        ]
    out = _check_weights(spec, weights_in, fallback_random_init)
    for asked, check, fix in (
        (prompts, lambda: nm.prompt_support(spec.arch), "use a ViT CLIP (ViT-B-32, PE-Core-B-16, ...) or --no-tune"),
        (text, lambda: nm.tokenizer_available(spec), "provide the tokenizer files, or run once online"),
    ):
        ok, why = check() if asked else (True, "")
        out += [] if ok else [_problem(arch_in, why, fix)]
    return out


def check_dino(spec, fallback_random_init: bool = False, names=("dino_model", "dino_checkpoint")) -> list:
    """timm knows the model; weights present, downloadable, or random init asked."""
    name_in, ckpt_in = names
    if spec is None:
        return []

    spec = concrete_dino(spec)
    base = _TINY_TIMM.get(spec.name, (spec.name,))[0].split(".")[0]
    if base not in _KNOWN_TIMM and not _timm_is_model(base):
        return [
            _problem(
                name_in,
                f"unknown timm model {spec.name!r}",
                "use e.g. vit_small_patch16_224.dino, vit_base_patch16_224.dino or auto",
            )
        ]
    if spec.feature not in {"cls", "pooled"}:
        return [_problem(name_in, f"DINO feature must be 'cls' or 'pooled', not {spec.feature!r}")]
    return _check_weights(spec, ckpt_in if spec.checkpoint else name_in, fallback_random_init)


# The DINO backbones people name most: known without importing timm (seconds on a cold start).
_KNOWN_TIMM = frozenset(
    {
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_small_patch8_224",
        "vit_base_patch8_224",
        "vit_tiny_patch16_224",
    }
)


def _timm_is_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _check_weights(spec, input_name: str, fallback: bool) -> list:
    try:
        ok, why = _weights(spec)
    except ModelNotFoundError as e:
        return [_problem(input_name, str(e), "fix the path")]
    except Exception as e:  # an unreadable config or a broken hub client: say so, do not crash
        ok, why = False, f"could not check the weights of {spec!r} ({type(e).__name__}: {e})"
    if ok:
        return []
    if fallback:
        return [
            _problem(
                input_name,
                why + " Continuing with RANDOM weights (fallback asked): labels are meaningless.",
                error=False,
            )
        ]
    return [
        _problem(
            input_name, why, "or pass --fallback-random-init / random_init=True to run on random weights on purpose"
        )
    ]


def check_device(device: Optional[str], input_name: str = "device") -> list:
    """A device torch knows and this machine has."""

    if device in (None, "", "auto"):
        return []
    try:
        resolve_device(device)
    except InvalidInputError as e:
        return [_problem(input_name, str(e), "use cpu, cuda, cuda:N or auto")]
    except (RuntimeError, ValueError) as e:
        return [_problem(input_name, f"unknown device {device!r} ({e})", "use cpu, cuda, cuda:N or auto")]
    return []


def _existing_ancestor(p: Path) -> Path:
    p = p.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path, input_name: str, what: str, is_file: bool = False, need_bytes: int = 0) -> list:
    """``path`` (a directory, or a file's directory) can be created/written, without creating it."""
    if not path:
        return []
    p = Path(path).expanduser()
    if is_file and p.is_dir():
        return [_problem(input_name, f"{what} {p} is a directory", "give a file path")]
    target = p.parent if is_file else p
    if target.exists() and not target.is_dir():
        return [_problem(input_name, f"{what} {target} exists and is not a directory", "choose another path")]
    anc = _existing_ancestor(target)
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        return [
            _problem(
                input_name,
                f"{what} {target} is not writable (nearest existing directory {anc} is read-only for this user)",
                "choose a writable location",
            )
        ]
    if need_bytes:
        free = shutil.disk_usage(anc).free
        if free < need_bytes:
            return [
                _problem(
                    input_name,
                    f"{what} {target} needs about {_human(need_bytes)} but only {_human(free)} is free",
                    "free space or choose another disk",
                )
            ]
    return []


def check_field(name: str, config, field_: str) -> list:
    """``config.<field_>`` within the bounds its config class declares (core.config.bounded)."""
    b = bounds(type(config), field_)
    return check_range(name, getattr(config, field_), b.lo, b.hi, integer=b.integer, what=b.what)


def check_range(
    name: str, value, lo=None, hi=None, allow_none: bool = True, integer: bool = False, what: str = ""
) -> list:
    """``value`` within ``[lo, hi]`` (None allowed when ``allow_none``)."""
    if value is None:
        return [] if allow_none else [_problem(name, f"{what or name} is required")]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
        return [_problem(name, f"{what or name} must be {'an integer' if integer else 'a number'}, not {value!r}")]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = (
            f"between {lo} and {hi}"
            if lo is not None and hi is not None
            else f">= {lo}"
            if lo is not None
            else f"<= {hi}"
        )
        return [_problem(name, f"{what or name} must be {rng}, not {value}", f"give a value {rng}")]
    return []


def _sample_positions(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def check_images(paths: Sequence[str], input_name: str = "samples", sample_size: int = 8) -> list:
    """A few images, spread over the list, open and decode; warn on some bad, fail on all bad."""
    from PIL import Image

    if not paths:
        return []
    picked = [paths[i] for i in _sample_positions(len(paths), sample_size)]
    bad = []
    for p in picked:
        try:
            with Image.open(p) as im:
                im.draft("RGB", (64, 64))
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            bad.append((p, f"{type(e).__name__}: {e}"))
    if not bad:
        return []
    detail = "; ".join(f"{p} ({why[:80]})" for p, why in bad[:3])
    if len(bad) == len(picked):
        return [
            _problem(
                input_name,
                f"none of the {len(picked)} images checked can be read: {detail}",
                "check the image paths (moved or unmounted files?) and formats",
            )
        ]
    return [
        _problem(
            input_name,
            f"{len(bad)} of {len(picked)} images checked cannot be read ({detail}); "
            "unreadable images are skipped and tagged nola:unreadable",
            error=False,
        )
    ]


def check_output_fields(samples, outputs: Mapping[str, str], label_type: str = "Classification") -> list:
    """Output fields: valid names, no clash with each other, existing fields that will be overwritten."""
    import fiftyone as fo

    out = []
    names = [f for f in outputs.values() if f]
    for inp, f in outputs.items():
        if not f:
            continue
        if not f.replace("_", "a").isalnum() or f[0].isdigit() or "." in f:
            out.append(_problem(inp, f"{f!r} is not a valid field name", "use letters, digits and underscores"))
        elif names.count(f) > 1:
            out.append(_problem(inp, f"output field {f!r} is used for two outputs", "give each output its own field"))
    if samples is None:
        return out
    schema = samples.get_field_schema()
    want = getattr(fo, label_type)

    ds = _root(samples)
    ran = set(ds.list_runs())
    for inp, f in outputs.items():
        if not f or f not in schema:
            continue
        doc = getattr(schema[f], "document_type", None)
        if doc is None or not issubclass(doc, want):
            got = getattr(doc, "__name__", type(schema[f]).__name__)
            out.append(
                _problem(
                    inp,
                    f"field {f!r} exists and holds {got}, not {label_type}; it cannot be written",
                    "choose another output field name",
                )
            )
        elif runs.run_key_for(f) not in ran:
            out.append(
                _problem(
                    inp,
                    f"field {f!r} already exists and was not written by this library: its values will be overwritten",
                    error=False,
                )
            )
        else:
            out.append(
                _problem(
                    inp,
                    f"field {f!r} holds an earlier run's labels: reused when up to date, else overwritten",
                    error=False,
                )
            )
    return out


def _root(samples):
    return samples._root_dataset if hasattr(samples, "_root_dataset") else samples


def check_engine(engine: str, precision: str, names=("engine", "precision")) -> list:
    """Known engine and precision, in a combination that can run (int8 is OpenVINO's)."""
    for name, value, known in zip(names, (engine, precision), (engines.ENGINES, engines.PRECISIONS)):
        if value not in known:
            return [_problem(name, f"unknown {name} {value!r}", f"use one of {', '.join(known)}")]
    try:
        engines.resolve(engine, precision, "cpu")
    except InvalidInputError as e:
        return [_problem(names[1], str(e))]
    return []
