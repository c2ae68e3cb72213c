"""One validation pass over a job's inputs, run before any stage does work.

Every entry point (``auto_label``, ``auto_label_multilabel``, the CLI commands, the operators)
calls into this module first. Each check returns :class:`Problem` items instead of raising, so
all the mistakes of a job are reported together, each naming its input and saying what to do.
Nothing here writes: no dataset, no directory, no run record, no cache.

``validate(...)`` (also ``python -m fiftyone_nola auto-label ... --check``) runs only this pass
and returns a :class:`Report` with the plan: stages to run or reuse, an estimated time from the
hardware profile, and the disk the stores will need.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fiftyone_nola.core.errors import (
    InvalidInputError,
    ModelNotFoundError,
    NolaError,
    ValidationError,
)

# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """One thing wrong (``error``) or worth knowing (warning) about one input."""

    input: str  # the input concerned, by its Python / operator parameter name ("" = the job)
    message: str
    fix: str = ""
    error: bool = True

    def render(self, names: Optional[Mapping[str, str]] = None) -> str:
        name = (names or {}).get(self.input, self.input)
        head = f"{name}: " if name else ""
        tail = f" -> {self.fix}" if self.fix else ""
        return f"{head}{self.message}{tail}"


@dataclass
class Report:
    """The outcome of the validation pass: problems, warnings and (on request) the plan."""

    problems: list = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.error]

    @property
    def warnings(self) -> list:
        return [p for p in self.problems if not p.error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self, names: Optional[Mapping[str, str]] = None) -> Report:
        if self.errors:
            raise ValidationError(self.problems, names)
        return self

    def lines(self, names: Optional[Mapping[str, str]] = None) -> list[str]:
        """Human-readable report: problems, warnings, then the plan."""
        out = []
        if self.errors:
            out.append(f"{len(self.errors)} problem(s):")
            out += [f"  - {p.render(names)}" for p in self.errors]
        if self.warnings:
            out.append("warnings:")
            out += [f"  - {p.render(names)}" for p in self.warnings]
        if self.plan:
            out += plan_lines(self.plan)
        if self.ok:
            out.append(f"inputs OK (checked in {self.seconds:.1f}s)")
        return out


# --------------------------------------------------------------------------- pure checks


def _problem(input_: str, message: str, fix: str = "", error: bool = True) -> Problem:
    return Problem(input_, message, fix, error)


def check_classes(classes, samples=None, min_classes: int = 2, input_name: str = "classes"
                  ) -> tuple[Optional[list], list]:
    """``(class list or None, problems)``: count, duplicates, empties, a missing classes file."""
    from fiftyone_nola.core.classes import parse_classes, resolve_classes

    if isinstance(classes, str) and classes.strip() and "\n" not in classes and "," not in classes:
        p = Path(classes).expanduser()
        if (os.sep in classes or p.suffix.lower() in {".txt", ".csv", ".json"}) and not p.is_file():
            return None, [_problem(input_name, f"classes file {p} does not exist",
                                   "give the path of a text file with one class name per line, or "
                                   "comma-separated names")]
    try:
        names = resolve_classes(classes, samples)
        if min_classes != 2:
            names = parse_classes(names, min_classes=min_classes)
        return names, []
    except InvalidInputError as e:
        return None, [_problem(input_name, str(e), "fix the class list (at least "
                                                   f"{min_classes} distinct, non-empty names)")]
    except OSError as e:
        return None, [_problem(input_name, f"cannot read the classes file: {e}", "check the path")]


def check_descriptions(path: Optional[str], classes: Optional[Sequence[str]], allow_template_fallback: bool,
                       input_name: str = "descriptions_file") -> list:
    """Readable, parseable, and covering every class (or fallback to templates explicitly allowed)."""
    if not path:
        return []
    from fiftyone_nola.core.descriptions import load_descriptions

    try:
        ds = load_descriptions(path, classes)
    except InvalidInputError as e:
        return [_problem(input_name, str(e), "fix the file: JSON {\"class name\": [\"description\", ...]}")]
    except OSError as e:
        return [_problem(input_name, f"cannot read {path}: {e}", "check the path and its permissions")]
    if classes is None:
        return []
    missing = [c for c in classes if ds.source.get(c) == "templates"]
    if not missing:
        return []
    shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
    covered = len(classes) - len(missing)
    msg = (f"the descriptions file {path} covers {covered} of {len(classes)} classes; it lacks "
           f"{len(missing)}: {shown}")
    if allow_template_fallback:
        return [_problem(input_name, msg + " (CLIP templates used for them, as allowed)", error=False)]
    return [_problem(input_name, msg, "add descriptions for them to the file, or allow CLIP template "
                                      "descriptions for the missing classes (allow_template_fallback / "
                                      "--allow-template-fallback)")]


def check_templates(templates, classes: Optional[Sequence[str]], input_name: str = "templates") -> list:
    """A template preset name, ``auto``, a readable template file or a list (``templates.py``)."""
    if templates is None:
        return []
    try:
        from fiftyone_nola.core.templates import resolve_templates
    except ImportError:
        return []
    try:
        resolve_templates(templates, classes or ())
    except InvalidInputError as e:
        return [_problem(input_name, str(e), "name a preset, auto, or a file of templates with one {} each")]
    except OSError as e:
        return [_problem(input_name, f"cannot read the template file: {e}", "check the path")]
    return []


def _gt_labels(samples, field_: str, doc_type) -> set:
    from fiftyone_nola.stages.fo_io import label_path

    return {x for x in samples.distinct(label_path(field_, doc_type)) if x is not None}


def check_gt_field(samples, field_: Optional[str], classes: Optional[Sequence[str]], multilabel: bool = False,
                   outputs: Sequence[str] = (), input_name: str = "gt_field", labels: Optional[set] = None
                   ) -> list:
    """Ground truth: exists, a label type evaluation understands, and which labels are unknown.

    ``labels``: the GT labels when the field does not exist yet (``--gt-from-subfolders``).
    """
    if not field_:
        return []
    import fiftyone as fo

    out = []
    if field_ in outputs:
        out.append(_problem(input_name, f"ground-truth field {field_!r} is also an output field of this job: "
                                        "it would be overwritten", "use another output field name"))
    if labels is None:
        if samples is None:
            return out
        schema = samples.get_field_schema(flat=True)
        if field_ not in schema:
            label_fields = sorted(k for k, v in schema.items() if "." not in k and _is_label(v))
            return out + [_problem(input_name, f"field {field_!r} does not exist on dataset "
                                               f"'{_root(samples).name}'",
                                   f"use one of its label fields ({', '.join(label_fields) or 'none'}) or leave "
                                   "it empty (no evaluation)")]
        doc_type = getattr(schema[field_], "document_type", None)
        ok_types = (fo.Classification, fo.Classifications, fo.Detections) if multilabel else (fo.Classification,)
        if doc_type is None or not issubclass(doc_type, ok_types):
            got = getattr(doc_type, "__name__", type(schema[field_]).__name__)
            want = "/".join(t.__name__ for t in ok_types)
            return out + [_problem(input_name, f"field {field_!r} holds {got}; evaluation needs {want}",
                                   "name a field of that label type")]
        labels = _gt_labels(samples, field_, doc_type)
    if classes is not None and labels:
        outside = sorted(labels - set(classes))
        if outside and len(outside) == len(labels):
            out.append(_problem(input_name, f"none of the labels in {field_!r} is in the class list "
                                            f"(it has {_preview(sorted(labels))})",
                                "check the class names against the ground truth's"))
        elif outside:
            out.append(_problem(input_name, f"{len(outside)} label(s) in {field_!r} are outside the class list: "
                                            f"{_preview(outside)}; those samples count as errors",
                                error=False))
    return out


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

    from fiftyone_nola.core.models import _CONFIG_DIR

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
    from fiftyone_nola.core.models import weights_available

    key = (type(spec).__name__, repr(spec), os.environ.get("NOLA_MODELS_DIR"))
    hit = _WEIGHTS_CACHE.get(key)
    if hit and time.monotonic() - hit[0] < 60:
        return hit[1]
    res = weights_available(spec)
    _WEIGHTS_CACHE[key] = (time.monotonic(), res)
    return res


def check_clip(spec, fallback_random_init: bool = False, names=("clip_arch", "clip_pretrained")) -> list:
    """Architecture known to open_clip; weights present, downloadable, or random init asked."""
    arch_in, weights_in = names
    if spec is None:
        return []
    if not spec.arch.startswith("hf-hub:") and spec.arch not in _clip_archs():
        near = sorted(a for a in _clip_archs() if a.lower()[:5] == spec.arch.lower()[:5])[:8]
        return [_problem(arch_in, f"unknown CLIP architecture {spec.arch!r}",
                         f"use an open_clip architecture, e.g. {', '.join(near) or 'ViT-B-32, ViT-B-16, ViT-L-14'}")]
    return _check_weights(spec, weights_in, fallback_random_init)


def check_dino(spec, fallback_random_init: bool = False, names=("dino_model", "dino_checkpoint")) -> list:
    """timm knows the model; weights present, downloadable, or random init asked."""
    name_in, ckpt_in = names
    if spec is None:
        return []
    from fiftyone_nola.core.models import _TINY_TIMM, concrete_dino

    spec = concrete_dino(spec)
    base = _TINY_TIMM.get(spec.name, (spec.name,))[0].split(".")[0]
    if base not in _KNOWN_TIMM and not _timm_is_model(base):
        return [_problem(name_in, f"unknown timm model {spec.name!r}",
                         "use e.g. vit_small_patch16_224.dino, vit_base_patch16_224.dino or auto")]
    if spec.feature not in {"cls", "pooled"}:
        return [_problem(name_in, f"DINO feature must be 'cls' or 'pooled', not {spec.feature!r}")]
    return _check_weights(spec, ckpt_in if spec.checkpoint else name_in, fallback_random_init)


# The DINO backbones people name most: known without importing timm (seconds on a cold start).
_KNOWN_TIMM = frozenset({"vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch8_224",
                         "vit_base_patch8_224", "vit_tiny_patch16_224"})


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
        return [_problem(input_name, why + " Continuing with RANDOM weights (fallback asked): labels are "
                                           "meaningless.", error=False)]
    return [_problem(input_name, why, "or pass --fallback-random-init / random_init=True to run on random "
                                      "weights on purpose")]


def check_device(device: Optional[str], input_name: str = "device") -> list:
    """A device torch knows and this machine has."""
    from fiftyone_nola.core.device import resolve_device

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
        return [_problem(input_name, f"{what} {target} is not writable (nearest existing directory {anc} is "
                                     "read-only for this user)", "choose a writable location")]
    if need_bytes:
        free = shutil.disk_usage(anc).free
        if free < need_bytes:
            return [_problem(input_name, f"{what} {target} needs about {_human(need_bytes)} but only "
                                         f"{_human(free)} is free", "free space or choose another disk")]
    return []


def check_range(name: str, value, lo=None, hi=None, allow_none: bool = True, integer: bool = False,
                what: str = "") -> list:
    """``value`` within ``[lo, hi]`` (None allowed when ``allow_none``)."""
    if value is None:
        return [] if allow_none else [_problem(name, f"{what or name} is required")]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
        return [_problem(name, f"{what or name} must be {'an integer' if integer else 'a number'}, "
                               f"not {value!r}")]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = (f"between {lo} and {hi}" if lo is not None and hi is not None
               else f">= {lo}" if lo is not None else f"<= {hi}")
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
        return [_problem(input_name, f"none of the {len(picked)} images checked can be read: {detail}",
                         "check the image paths (moved or unmounted files?) and formats")]
    return [_problem(input_name, f"{len(bad)} of {len(picked)} images checked cannot be read ({detail}); "
                                 "unreadable images are skipped and tagged nola:unreadable", error=False)]


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
    from fiftyone_nola.stages import runs

    ds = _root(samples)
    ran = set(ds.list_runs())
    for inp, f in outputs.items():
        if not f or f not in schema:
            continue
        doc = getattr(schema[f], "document_type", None)
        if doc is None or not issubclass(doc, want):
            got = getattr(doc, "__name__", type(schema[f]).__name__)
            out.append(_problem(inp, f"field {f!r} exists and holds {got}, not {label_type}; it cannot be "
                                     "written", "choose another output field name"))
        elif runs.run_key_for(f) not in ran:
            out.append(_problem(inp, f"field {f!r} already exists and was not written by this library: "
                                     "its values will be overwritten", error=False))
        else:
            out.append(_problem(inp, f"field {f!r} holds an earlier run's labels: reused when up to date, "
                                     "else overwritten", error=False))
    return out


def _root(samples):
    return samples._root_dataset if hasattr(samples, "_root_dataset") else samples


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """What a job runs on: an existing collection, or a folder of images not imported yet.

    The CLI validates a folder *before* importing it, so that a failed check creates no dataset.
    """

    samples: Any = None
    images_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    gt_from_subfolders: Optional[str] = None
    max_samples: Optional[int] = None
    _files: Optional[list] = field(default=None, repr=False)

    @property
    def input_name(self) -> str:
        return "images" if self.images_dir else ("dataset" if self.dataset_name else "samples")

    def files(self) -> list:
        """Image files of the folder (after ``max_samples``), listed once."""
        if self._files is None:
            from fiftyone_nola.stages.fo_io import list_images

            files = list_images(self.images_dir)
            if self.max_samples:
                step = max(1, len(files) // self.max_samples)
                files = files[::step][: self.max_samples]
            self._files = files
        return self._files


def resolve_target(target: Target) -> tuple[Target, list]:
    """Load an existing dataset by name (read-only); check the folder / collection is usable."""
    from fiftyone_nola.stages import fo_io

    problems: list = []
    if target.images_dir:
        try:
            files = target.files()
        except InvalidInputError as e:
            return target, [_problem("images", str(e), "give a folder that holds images")]
        problems += check_images(files, "images")
        name = target.dataset_name or Path(target.images_dir).expanduser().resolve().name
        if target.samples is None:
            import fiftyone as fo

            fo_io.connect_database()
            try:
                names = fo.list_datasets()
            except Exception as e:  # the database itself is another error, said by fo_io
                raise fo_io.DatabaseUnavailableError(fo_io._db_hint(e)) from e
            if name in names:
                target.samples = fo.load_dataset(name)
        if target.max_samples is not None:
            problems += check_range("max_samples", target.max_samples, lo=1, integer=True)
        return target, problems
    if target.samples is None and target.dataset_name:
        try:
            target.samples = fo_io.get_dataset(target.dataset_name)
        except NolaError as e:
            return target, [_problem("dataset", str(e))]
    if target.samples is None:
        return target, [_problem("images", "no images given", "give --images DIR or --dataset NAME")]
    n = len(target.samples)
    if n == 0:
        return target, [_problem(target.input_name, "the dataset or view holds no samples",
                                 "add images, or clear the view's filters / selection")]
    positions = _sample_positions(n, 8)
    paths = target.samples.values("filepath")
    problems += check_images([paths[i] for i in positions], target.input_name)
    return target, problems


def target_count(target: Target) -> int:
    """How many samples the job will act on (for a folder: existing plus new files)."""
    if target.images_dir:
        files = target.files()
        if target.samples is not None:
            have = set(target.samples.values("filepath"))
            return len(target.samples) + sum(1 for f in files if f not in have)
        return len(files)
    return len(target.samples) if target.samples is not None else 0


def _subfolder_labels(target: Target) -> set:
    return {Path(f).parent.name for f in target.files()}


def _check_target_gt(target: Target, gt: Optional[str], classes, outputs: list, multilabel: bool) -> list:
    """The ground-truth field of a collection, or of a folder about to be imported."""
    samples = target.samples
    if gt and target.images_dir and target.gt_from_subfolders == gt:
        labels = _subfolder_labels(target) if samples is None or gt not in samples.get_field_schema() else None
        return check_gt_field(samples, gt, classes, multilabel, outputs, labels=labels)
    if gt and samples is None and target.images_dir:
        return [_problem("gt_field", f"field {gt!r} does not exist: the dataset is created from the folder "
                                     "and holds no ground truth",
                         "use --gt-from-subfolders FIELD to store each image's folder name as ground truth, "
                         "or leave it out (no evaluation)")]
    return check_gt_field(samples, gt, classes, multilabel, outputs)


# --------------------------------------------------------------------------- jobs


def _job_inputs(target: Target, classes, config, fallback_random_init: bool) -> tuple[Target, list, list]:
    """What every whole-pipeline job checks first: target, class list, models and device."""
    target, problems = resolve_target(target)
    classes_list, p = check_classes(classes, target.samples)
    problems += p
    problems += check_clip(config.clip, fallback_random_init)
    if config.dino is not None:
        problems += check_dino(config.dino, fallback_random_init)
    problems += check_device(config.device)
    return target, classes_list, problems


def check_auto_label(target: Target, classes, config, fallback_random_init: bool = False,
                     json_out: Optional[str] = None, plan: bool = False) -> Report:
    """Every input of the single-label pipeline (``auto_label``); the plan when ``plan``."""
    t0 = time.perf_counter()
    from fiftyone_nola.core.storage import nola_home

    target, classes_list, problems = _job_inputs(target, classes, config, fallback_random_init)
    samples = target.samples
    problems += check_descriptions(config.descriptions_file, classes_list, config.allow_template_fallback)
    problems += check_templates(getattr(config, "templates", None), classes_list)
    outputs = {"zeroshot_field": config.zeroshot_field, "dino_field": config.dino_field}
    if config.tune:
        outputs["tuned_field"] = config.tuned_field
    problems += check_output_fields(samples, outputs)
    problems += _check_target_gt(target, config.gt_field, classes_list, list(outputs.values()), False)
    problems += check_range("tune_epochs", config.tune_epochs, lo=1, hi=10_000, integer=True, what="epochs")
    problems += check_range("tune_batch_size", config.tune_batch_size, lo=1, integer=True, what="batch size")
    if config.tune_max_samples not in (-1, None):
        problems += check_range("tune_max_samples", config.tune_max_samples, lo=1, integer=True,
                                what="tuning sample limit")
    problems += check_range("max_descriptions_per_class", config.max_descriptions_per_class, lo=1, integer=True,
                            what="descriptions per class")
    problems += check_range("batch_size", config.embed.batch_size, lo=1, integer=True, what="batch size")
    problems += check_range("num_workers", config.embed.num_workers, lo=0, hi=256, integer=True, what="workers")
    if config.embed.index_type not in _index_types():
        problems.append(_problem("index_type", f"unknown index type {config.embed.index_type!r}",
                                 f"use one of {', '.join(_index_types())}"))
    if config.use_llm and config.descriptions_file:
        problems.append(_problem("use_llm", "both a descriptions file and LLM descriptions were asked for; "
                                            "the file wins", error=False))
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    report = Report(problems)
    n = target_count(target) if report.ok or plan else 0
    need = 0
    if report.ok or plan:
        try:
            need = _disk_needed(config, n, len(classes_list or []))
        except Exception:  # the estimate is advice only
            need = 0
    report.problems += check_writable(nola_home(), "storage", "NOLA_HOME", need_bytes=need)
    if plan and report.ok:
        report.plan = plan_auto_label(target, classes_list, config, n, need)
    report.seconds = time.perf_counter() - t0
    return report


def check_multilabel(target: Target, classes, config, fallback_random_init: bool = False,
                     json_out: Optional[str] = None, plan: bool = False) -> Report:
    """Every input of ``auto_label_multilabel``."""
    t0 = time.perf_counter()
    from fiftyone_nola.core.storage import nola_home

    target, classes_list, problems = _job_inputs(target, classes, config, fallback_random_init)
    samples = target.samples
    if not config.single_template:
        problems += check_descriptions(config.descriptions_file, classes_list,
                                       getattr(config, "allow_template_fallback", False))
    outputs = {"pseudo_field": config.pseudo_field, "pred_field": config.pred_field}
    problems += check_output_fields(samples, outputs, "Classifications")
    problems += _check_target_gt(target, config.gt_field, classes_list, list(outputs.values()), True)
    problems += check_range("grid", config.grid, lo=1, hi=16, integer=True)
    problems += check_range("threshold_t", config.threshold_t, lo=0.0, hi=1.0)
    problems += check_range("lam", config.lam, lo=0.0, hi=1.0)
    problems += check_range("ratio", config.ratio, lo=0.0, hi=1.0)
    problems += check_range("max_labels", config.max_labels, lo=1, integer=True)
    problems += check_range("train_epochs", config.train_epochs, lo=1, hi=100_000, integer=True, what="epochs")
    problems += check_range("label_update_every", config.label_update_every, lo=0, integer=True,
                            what="label update interval (0: never)")
    problems += check_range("label_warmup", config.label_warmup, lo=0, integer=True, what="warm-up epochs")
    problems += check_range("crop_batch_size", config.crop_batch_size, lo=1, integer=True, what="crop batch size")
    problems += check_range("num_workers", config.num_workers, lo=0, hi=256, integer=True, what="workers")
    if config.aggregation not in ("avg", "lambda", "global"):
        problems.append(_problem("aggregation", f"unknown aggregation {config.aggregation!r}",
                                 "use avg, lambda or global"))
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    report = Report(problems)
    if plan and report.ok:
        n = target_count(target)
        report.plan = {"samples": n, "stages": [
            _stage("embeddings", "run", n, _embed_seconds(config.clip, n, config.device)),
            _stage("pseudo_labels", "run", n, n * config.grid ** 2 / _rate(config.clip, config.device)),
            _stage("classifier", "run", n, 1.0 + n * 1e-4)]}
        _finish_plan(report.plan, config.device, 0)
    report.seconds = time.perf_counter() - t0
    return report


def check_embed(target: Target, family: str, clip, dino, embed_cfg, fallback_random_init: bool = False,
                json_out: Optional[str] = None) -> Report:
    """Every input of the embedding stage."""
    from fiftyone_nola.core.storage import nola_home

    t0 = time.perf_counter()
    target, problems = resolve_target(target)
    if family not in ("clip", "dino", "both"):
        problems.append(_problem("family", f"family must be clip, dino or both, not {family!r}"))
    if family in ("clip", "both"):
        problems += check_clip(clip, fallback_random_init)
    if family in ("dino", "both"):
        problems += check_dino(dino, fallback_random_init)
    problems += check_device(embed_cfg.device)
    problems += check_range("batch_size", embed_cfg.batch_size, lo=1, integer=True, what="batch size")
    problems += check_range("num_workers", embed_cfg.num_workers, lo=0, hi=256, integer=True, what="workers")
    if embed_cfg.index_type not in _index_types():
        problems.append(_problem("index_type", f"unknown index type {embed_cfg.index_type!r}",
                                 f"use one of {', '.join(_index_types())}"))
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    r = Report(problems)
    r.seconds = time.perf_counter() - t0
    return r


_UNSET = object()


def check_params(samples, *, classes=_UNSET, min_classes: int = 2, descriptions_file: Optional[str] = None,
                 allow_template_fallback: bool = True, templates=None, clip=None, dino=None, fallback_random_init: bool = False,
                 device: Optional[str] = None, gt_field: Optional[str] = None, gt_multilabel: bool = False,
                 outputs: Optional[Mapping[str, str]] = None, output_type: str = "Classification",
                 fields: Optional[Mapping[str, tuple]] = None, stages: Optional[Mapping[str, tuple]] = None,
                 ranges: Optional[Mapping[str, tuple]] = None, writable: Optional[Mapping[str, tuple]] = None,
                 files: Optional[Mapping[str, str]] = None, need_samples: bool = True) -> Report:
    """The checks a single stage (an operator) needs, by input name; nothing is written.

    ``fields``: input -> (field name, label type names) that must exist; ``stages``: input ->
    (field, what) whose stage must have run; ``ranges``: input -> (value, lo, hi, integer);
    ``writable``: input -> (path, what, is_file); ``files``: input -> a path that must exist.
    """
    from fiftyone_nola.core.storage import nola_home

    t0 = time.perf_counter()
    problems: list = []
    if samples is not None and need_samples:
        _, problems = resolve_target(Target(samples=samples))
    names = None
    if classes is not _UNSET:
        names, p = check_classes(classes, samples, min_classes)
        problems += p
    problems += check_descriptions(descriptions_file, names, allow_template_fallback)
    problems += check_templates(templates, names)
    problems += check_clip(clip, fallback_random_init)
    problems += check_dino(dino, fallback_random_init)
    problems += check_device(device)
    outputs = dict(outputs or {})
    problems += check_output_fields(samples, outputs, output_type)
    problems += check_gt_field(samples, gt_field, names, gt_multilabel, list(outputs.values()))
    schema = samples.get_field_schema(flat=True) if samples is not None and fields else {}
    for inp, (f, kinds) in (fields or {}).items():
        if not f:
            problems.append(_problem(inp, "a field name is required"))
            continue
        if f not in schema:
            problems.append(_problem(inp, f"field {f!r} does not exist on this dataset",
                                     "pick an existing field, or run the stage that writes it first"))
            continue
        doc = getattr(schema[f], "document_type", None)
        if kinds and (doc is None or doc.__name__ not in kinds):
            problems.append(_problem(inp, f"field {f!r} holds {getattr(doc, '__name__', 'no labels')}, not "
                                          f"{'/'.join(kinds)}", "pick a field of that label type"))
    if samples is not None:
        from fiftyone_nola.stages.artifacts import stage_dir

        for inp, (f, what) in (stages or {}).items():
            if f and not (stage_dir(samples, f) / "meta.json").exists():
                problems.append(_problem(inp, f"the {what} stage has not been run into {f!r} on this dataset",
                                         f"run the {what} stage first, or name the field it wrote"))
    for inp, (v, lo, hi, integer) in (ranges or {}).items():
        problems += check_range(inp, v, lo, hi, integer=integer)
    for inp, (path, what, is_file) in (writable or {}).items():
        problems += check_writable(path, inp, what, is_file)
    for inp, path in (files or {}).items():
        if not path:
            problems.append(_problem(inp, "a path is required"))
        elif not Path(path).expanduser().exists():
            problems.append(_problem(inp, f"{path} does not exist", "give an existing path"))
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    r = Report(problems)
    r.seconds = time.perf_counter() - t0
    return r


def _index_types() -> tuple:
    from fiftyone_nola.core.index import INDEX_TYPES

    return INDEX_TYPES


# --------------------------------------------------------------------------- plan


# Images per second of one forward pass on a 2-core CPU by model size (patch 16; patch 32 is
# ~3x cheaper), fitted to the README's 1,000-image demo (ViT-B-32 embed/predict ~13 img/s,
# DINO ViT-S/16 ~9 img/s, tuning ~2.5x a forward pass); a GPU is taken as ~40x faster.
# Advice only: the real figure is printed as each stage runs.
_CPU_RATES = {"tiny": 400.0, "S": 9.0, "B": 4.0, "L": 0.8, "H": 0.3, "g": 0.2}
_TRAIN_COST = 2.5
_GPU_SPEEDUP = 40.0


def _size_class(name: str) -> str:
    n = name.lower()
    if "tiny" in n:
        return "tiny"
    for tag, size in (("small", "S"), ("-s-", "S"), ("base", "B"), ("-b-", "B"), ("large", "L"), ("-l-", "L"),
                      ("huge", "H"), ("-h-", "H"), ("giant", "g"), ("-g-", "g")):
        if tag in f"-{n}-".replace("_", "-"):
            return size
    return "B"


def _rate(spec, device) -> float:
    from fiftyone_nola.core.device import resolve_device

    name = getattr(spec, "arch", None) or getattr(spec, "name", "")
    if getattr(spec, "name", None) == "auto":
        from fiftyone_nola.core.models import concrete_dino

        name = concrete_dino(spec).name
    rate = _CPU_RATES[_size_class(name)]
    if "32" in name.replace("224", "").split("patch")[-1].split("-"):
        rate *= 3.25
    try:
        dev = resolve_device(device)
    except Exception:
        return rate
    return rate * (_GPU_SPEEDUP if dev.type == "cuda" else 1.0)


def _embed_seconds(spec, n: int, device) -> float:
    return n / _rate(spec, device) if n else 0.0


def _embed_dim(spec) -> int:
    from fiftyone_nola.core.models import ClipSpec, concrete_dino

    if isinstance(spec, ClipSpec):
        import open_clip

        try:
            cfg = open_clip.get_model_config(spec.arch) or {}
            return int(cfg.get("embed_dim", 512))
        except Exception:
            return 512
    name = concrete_dino(spec).name
    return {"tiny": 48, "S": 384, "B": 768, "L": 1024, "H": 1280, "g": 1536}[_size_class(name)]


def _disk_needed(config, n: int, n_classes: int) -> int:
    """Bytes the stores of a run will hold: vectors + ids/fingerprints, and the stage arrays."""
    per_vec = 4 * (_embed_dim(config.clip) + _embed_dim(config.dino)) + 2 * 80
    stage_rows = 4 * max(n_classes, 1) * 4 + 64
    tuned = 40 << 20 if config.tune else 0
    return int(n * (per_vec + stage_rows) + tuned)


def _stage(name: str, action: str, todo: int, seconds: float, detail: str = "") -> dict:
    return {"stage": name, "action": action, "samples": int(todo), "seconds": float(seconds), "detail": detail}


def plan_auto_label(target: Target, classes, config, n: int, disk: int) -> dict:
    """Stages ``auto_label`` would run or reuse on ``target``, with time and disk estimates."""
    samples = target.samples
    new = n - (len(samples) if samples is not None else 0)
    stages = []
    if samples is None or len(samples) == 0:
        todo = {s: n for s in ("clip", "dino", "zeroshot", "dino_labeler", "predict")}
        retrain = {"dino_labeler": True, "prompt_tuning": True}
    else:
        from fiftyone_nola.pipeline import plan_stages

        todo, retrain = plan_stages(samples, classes, config, extra_new=new)
    dev = config.device
    stages.append(_stage("embeddings:clip", "run" if todo["clip"] else "reuse", todo["clip"],
                         _embed_seconds(config.clip, todo["clip"], dev)))
    stages.append(_stage("embeddings:dino", "run" if todo["dino"] else "reuse", todo["dino"],
                         _embed_seconds(config.dino, todo["dino"], dev)))
    stages.append(_stage("zeroshot", "run" if todo["zeroshot"] else "reuse", todo["zeroshot"],
                         0.05 + todo["zeroshot"] * 1e-4
                         + (len(classes or []) * 90 / (10 * _rate(config.clip, dev)) if todo["zeroshot"] == n and n
                            else 0.0),
                         "texts encoded once, then cached"))
    stages.append(_stage("dino_labeler", "train+label" if retrain["dino_labeler"] else
                         ("label new" if todo["dino_labeler"] else "reuse"), todo["dino_labeler"],
                         (2.0 if retrain["dino_labeler"] else 0.0) + todo["dino_labeler"] * 3e-3))
    if config.tune:
        from fiftyone_nola.core.device import hardware_profile, resolve_device

        try:
            prof = hardware_profile(resolve_device(dev))
        except Exception:
            prof = hardware_profile()
        epochs = config.tune_epochs or prof.tune_epochs
        cap = prof.tune_max_samples if config.tune_max_samples == -1 else config.tune_max_samples
        m = min(n, cap) if cap else n
        stages.append(_stage("prompt_tuning", "train" if retrain["prompt_tuning"] else "reuse",
                             m if retrain["prompt_tuning"] else 0,
                             epochs * m * _TRAIN_COST / _rate(config.clip, dev) if retrain["prompt_tuning"] else 0.0,
                             f"{epochs} epochs on <= {m} samples"))
        stages.append(_stage("predict", "run" if todo["predict"] else "reuse", todo["predict"],
                             todo["predict"] / _rate(config.clip, dev)))
    if config.gt_field:
        stages.append(_stage("evaluate", "run", n, 1.0))
    plan = {"samples": n, "new_samples": max(new, 0), "classes": len(classes or []), "stages": stages}
    _finish_plan(plan, dev, disk)
    return plan


def _finish_plan(plan: dict, device, disk: int) -> None:
    from fiftyone_nola.core.device import hardware_profile, resolve_device
    from fiftyone_nola.core.storage import nola_home

    try:
        prof = hardware_profile(resolve_device(device))
        plan["hardware"] = prof.describe()
    except Exception:
        plan["hardware"] = "unknown"
    plan["seconds"] = float(sum(s["seconds"] for s in plan["stages"]))
    plan["disk_bytes"] = int(disk)
    plan["storage"] = str(nola_home())


def plan_lines(plan: dict) -> list[str]:
    """The plan as printed by ``--check``."""
    lines = [f"plan: {plan.get('samples', 0)} samples"
             + (f" ({plan['new_samples']} new)" if plan.get("new_samples") else "")
             + (f", {plan['classes']} classes" if plan.get("classes") else "")]
    for s in plan.get("stages", []):
        extra = f"  [{s['detail']}]" if s.get("detail") else ""
        lines.append(f"  {s['stage']:<16} {s['action']:<12} {s['samples']:>8} samples  ~{_duration(s['seconds'])}"
                     f"{extra}")
    lines.append(f"estimated time: ~{_duration(plan.get('seconds', 0.0))} on {plan.get('hardware', '?')}")
    lines.append(f"disk for the stores: ~{_human(plan.get('disk_bytes', 0))} under {plan.get('storage')}")
    return lines


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# --------------------------------------------------------------------------- Python entry point


def validate(samples, classes=None, config=None, *, plan: bool = True, log: Optional[Callable[[str], None]] = print,
             raise_on_error: bool = False, fallback_random_init: bool = False) -> Report:
    """Check every input of ``auto_label`` (or ``auto_label_multilabel`` for a ``MultiLabelConfig``)
    without running or writing anything; print and return the report with the plan.

    ``samples`` may be a dataset, a view, or a folder of images (not imported).
    """
    from fiftyone_nola.pipeline import AutoLabelConfig
    from fiftyone_nola.stages.cdul import MultiLabelConfig

    target = Target(images_dir=str(samples)) if isinstance(samples, (str, os.PathLike)) else Target(samples=samples)
    config = config or AutoLabelConfig()
    if isinstance(config, MultiLabelConfig):
        report = check_multilabel(target, classes, config, fallback_random_init, plan=plan)
    else:
        report = check_auto_label(target, classes, config, fallback_random_init, plan=plan)
    if log is not None:
        for line in report.lines():
            log(line)
    if raise_on_error:
        report.raise_for_errors()
    return report


def replace_random_init(spec):
    """``spec`` with random init on (the explicit fallback of a run without weights)."""
    return dataclasses.replace(spec, random_init=True)


__all__ = ["Problem", "Report", "Target", "ValidationError", "check_auto_label", "check_embed",
           "check_multilabel", "check_params", "validate"]
