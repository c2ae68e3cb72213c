"""``engine="auto"`` on a CPU: the fastest engine that agrees with PyTorch fp32 on the caller's
own images, measured once per (model weights, CPU, library versions) and cached (no FiftyOne).

Candidates are PyTorch fp32 and the OpenVINO precisions this CPU makes worth measuring
(:func:`cpu_isa.candidate_precisions`: fp32; bf16 where native; int8 with VNNI/AMX). Each runs
the same preprocessed images (up to :data:`CHECK_IMAGES`, none of them used for int8
calibration); its outputs are compared with PyTorch fp32's by the caller's agreement check
(:func:`embedding_agreement`, :func:`label_agreement`). The fastest candidate that passes and is
at least :data:`MIN_SPEEDUP` times faster than PyTorch wins; otherwise PyTorch fp32 runs.

Two caches beside the converted models (``$NOLA_HOME/engines``):

* ``choices/``: one JSON per (model identity, weights fingerprint, input size, kind of check,
  CPU model and instruction set, library versions): the decision and its figures. A second
  process reads it and measures nothing.
* ``speed/``: seconds per image of each candidate per (architecture: parameter names and
  shapes; input size; CPU; threads; versions). New weights of a measured architecture (a
  re-tuned model) convert nothing when no candidate was faster there, and otherwise measure and
  check only the candidates that were.

An int8 choice reused for a later job of at least :data:`SPOT_CHECK_MIN_FORWARDS` forward passes is checked again
on :data:`SPOT_CHECK_IMAGES` of the job's own images (int8 was calibrated on another job's);
if they disagree, the job runs the fastest other candidate that passed.

Measuring costs conversions plus a few passes over the check images, so it happens only for
jobs expected to pay it back (:mod:`fiftyone_nola.core.engine_payback` before anything is
measured; with a speed table, when the seconds a job saves exceed its conversion and check
seconds). Smaller jobs run PyTorch fp32 and record nothing; a choice made without int8 is
measured again, int8 included, by the first later job large enough for int8 to pay back.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core import cpu_isa, engines
from fiftyone_nola.core.arrays import l2_normalize
from fiftyone_nola.core.engine_payback import CHECK_IMAGES, PREFERENCE, first_measurement
from fiftyone_nola.core.engines import EngineChoice

FORMAT_VERSION = 1  # bump when the measurement or its thresholds change: every choice is re-measured
MIN_COSINE = {"fp32": 0.9999, "bf16": 0.999, "int8": 0.995}  # vs PyTorch fp32, every check image
MIN_ZERO_SHOT_AGREEMENT = 0.99  # same top-1 class as PyTorch fp32 (embeddings, classes known)
MIN_LABEL_AGREEMENT = 0.995  # same predicted label as PyTorch fp32 (tuned model, crop scores)
SPOT_CHECK_IMAGES = 32  # a reused int8 choice is checked again on this many of each large job's images
MIN_SPEEDUP = 1.05  # an engine must beat PyTorch fp32 by this much to be worth a second code path
SPOT_CHECK_MIN_FORWARDS = 500  # smaller jobs reuse an int8 choice without the spot check


@dataclass
class Probe:
    """The caller's own images a choice is measured on and how outputs must agree.

    ``agree(reference, candidate, precision)`` returns figures with ``passed`` (and ``why``);
    ``kind`` names the check (part of the choice's cache key); ``forwards`` is how many forward
    passes the job will run (the pay-back rule); ``check(n=None)`` returns (the first ``n``)
    preprocessed inputs (N x C x H x W float32) never used for calibration; ``calibration()``
    yields int8 batches.
    """

    agree: Callable[[np.ndarray, np.ndarray, str], dict]
    kind: str = "embeddings"
    forwards: int = 0
    batch_size: int = 32
    check: Optional[Callable[..., torch.Tensor]] = None
    calibration: Optional[Callable[[], Iterable]] = None


@dataclass
class _Target:
    """The forward being chosen for: ``module(x)`` on ``(N, *input_size)``, named by
    ``identity``, cached under ``root``, reporting through ``log``."""

    module: nn.Module
    identity: dict
    input_size: tuple
    root: Optional[os.PathLike]
    log: Callable[[str], None]

    def load(self, choice: EngineChoice, calibration=None):
        return engines.load_engine_model(
            self.module, self.identity, self.input_size, choice, calibration, self.root, log=self.log
        )

    def entry(self, ir: str) -> Path:
        return engines.entry_path(self.module, self.identity, self.input_size, ir, self.root)[0]


# ----------------------------------------------------------------------------- agreement


def _verdict(figures: dict, why: list[str]) -> dict:
    figures["passed"] = not why
    if why:
        figures["why"] = "; ".join(why)
    return figures


def embedding_agreement(class_weights=None) -> Callable[[np.ndarray, np.ndarray, str], dict]:
    """Embeddings agree when every image's cosine to PyTorch fp32 reaches :data:`MIN_COSINE` and,
    with ``class_weights`` (C x D class text embeddings, or a callable returning them, called
    only if a check runs), zero-shot top-1 is the same class on at least
    :data:`MIN_ZERO_SHOT_AGREEMENT` of the images."""
    cache: dict = {}

    def weights() -> Optional[np.ndarray]:
        if class_weights is not None and "w" not in cache:
            w = class_weights() if callable(class_weights) else class_weights
            cache["w"] = l2_normalize(np.asarray(w, dtype=np.float32))
        return cache.get("w")

    def agree(ref: np.ndarray, out: np.ndarray, precision: str) -> dict:
        a, b = l2_normalize(ref), l2_normalize(out)
        cos = (a * b).sum(1)
        need = MIN_COSINE.get(precision, MIN_COSINE["fp32"])
        f = {"min_cosine": round(float(cos.min()), 6), "median_cosine": round(float(np.median(cos)), 6)}
        why = [] if f["min_cosine"] >= need else [f"min cosine {f['min_cosine']:.4f} < {need}"]
        w = weights()
        if w is not None:
            top1 = float(((a @ w.T).argmax(1) == (b @ w.T).argmax(1)).mean())
            f["zero_shot_top1_agreement"] = round(top1, 4)
            if top1 < MIN_ZERO_SHOT_AGREEMENT:
                why.append(f"zero-shot top-1 agreement {top1:.3f} < {MIN_ZERO_SHOT_AGREEMENT}")
        return _verdict(f, why)

    return agree


def label_agreement(
    to_labels: Callable[[np.ndarray], np.ndarray] = lambda x: x.argmax(1),
) -> Callable[[np.ndarray, np.ndarray, str], dict]:
    """Outputs agree when ``to_labels`` gives the same label as PyTorch fp32 on at least
    :data:`MIN_LABEL_AGREEMENT` of the inputs."""

    def agree(ref: np.ndarray, out: np.ndarray, precision: str) -> dict:
        same = float((to_labels(ref) == to_labels(out)).mean())
        why = [] if same >= MIN_LABEL_AGREEMENT else [f"same label on {same:.3f} < {MIN_LABEL_AGREEMENT}"]
        return _verdict({"label_agreement": round(same, 4)}, why)

    return agree


# ----------------------------------------------------------------------------- cache


def architecture_signature(module: nn.Module) -> str:
    """What a module computes up to its weights' values: class, parameter names, shapes, dtypes."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def _cpu() -> dict:
    return {"isa": cpu_isa.cpu_isa(), "name": cpu_isa.cpu_name()}


def _file(root, folder: str, name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return engines.cache_root(root) / folder / f"{engines._safe(name)}-{digest}.json"


def choice_file(module: nn.Module, identity: dict, input_size: tuple, kind: str, precisions: list, root=None) -> Path:
    """Where the measured choice for these weights, this check and this CPU is cached."""
    key = {
        "format": FORMAT_VERSION,
        "identity": json.loads(json.dumps(identity, sort_keys=True, default=str)),
        "weights": engines.weights_fingerprint(module),
        "input": [int(s) for s in input_size],
        "kind": kind,
        "candidates": list(precisions),
        "cpu": _cpu(),
        "versions": engines.library_versions("openvino"),
    }
    return _file(root, "choices", f"{identity.get('key') or identity.get('name') or 'model'}-{kind}", key)


def speed_file(module: nn.Module, input_size: tuple, root=None) -> Path:
    """Where the candidates' measured speeds for this architecture on this CPU are cached."""
    key = {
        "format": FORMAT_VERSION,
        "architecture": architecture_signature(module),
        "input": [int(s) for s in input_size],
        "cpu": _cpu(),
        "threads": [engines.default_threads(), torch.get_num_threads()],
        "versions": engines.library_versions("openvino"),
    }
    return _file(root, "speed", type(module).__name__, key)


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: concurrent processes see a whole file or none


# ----------------------------------------------------------------------------- measuring


def _timed(fns: dict, batches: list[torch.Tensor]) -> dict:
    """``{name: (outputs, seconds per input)}`` of each forward in ``fns`` over ``batches``.

    The forwards take turns batch by batch (in a rotating order), and each one's time is its
    fastest batch after the first round (warm-up): load from other processes drifts, so it
    must fall on every candidate alike, and a busy moment must not decide.
    """
    names = list(fns)
    outs: dict = {n: [] for n in names}
    per: dict = {n: [] for n in names}
    rounds = list(enumerate(batches)) + ([(1, batches[0])] if len(batches) == 1 else [])
    with torch.inference_mode():
        for i, b in rounds:
            for n in names[i % len(names) :] + names[: i % len(names)]:
                t = time.perf_counter()
                y = fns[n](b)
                per[n].append((time.perf_counter() - t) / len(b))
                if len(outs[n]) < len(batches):
                    outs[n].append(y.float().cpu().numpy())
    return {n: (np.concatenate(outs[n]), min(per[n][1:])) for n in names}


def _unmeasured(speed: Optional[dict], precisions: list) -> list:
    """The candidates this architecture's speed table has never timed (nor seen fail)."""
    seen = set((speed or {}).get("s_per_image", {})) | set((speed or {}).get("failed", []))
    return [p for p in precisions if f"openvino-{p}" not in seen]


def _plan(target: _Target, precisions: list, speed: Optional[dict], forwards: int):
    """``(precisions to try in order, why not)``: ``None`` means skip measuring for this job."""
    if speed is None:
        order, why = first_measurement(precisions, forwards)
        return (order or None), why
    s = speed["s_per_image"]
    ref = s["torch-fp32"]
    faster = sorted(
        (p for p in precisions if s.get(f"openvino-{p}", ref) * MIN_SPEEDUP < ref), key=lambda p: s[f"openvino-{p}"]
    )
    unmeasured = _unmeasured(speed, precisions)
    if unmeasured:  # left out of the first measurement as not worth it then: worth it for this job?
        best = ref / min([ref] + [s[f"openvino-{p}"] for p in faster])
        if first_measurement(unmeasured, forwards, measured_speedup=best)[0]:
            return [p for p in PREFERENCE if p in faster + unmeasured], ""
    if not faster:
        return [], "no OpenVINO precision measured faster than PyTorch fp32 on this CPU"
    best = faster[0]
    cost = CHECK_IMAGES * (ref + s[f"openvino-{best}"])
    for ir in ("fp32", "int8") if best == "int8" else ("fp32",):
        if not (target.entry(ir) / "meta.json").is_file():
            cost += speed.get("conversion_seconds", {}).get(ir) or 0.0
    saved = forwards * (ref - s[f"openvino-{best}"])
    if saved < cost:
        return (
            None,
            f"{best} would save ~{saved:.0f}s on {forwards} forward passes, less than converting and checking ({cost:.0f}s)",
        )
    return faster, ""


def _ir_facts(target: _Target) -> dict:
    """Conversion seconds (and int8 calibration count) of the target's cached IRs."""
    out: dict = {"conversion_seconds": {}}
    for ir in ("fp32", "int8"):
        meta = _read(target.entry(ir) / "meta.json")
        if meta is not None:
            out["conversion_seconds"][ir] = meta.get("conversion_seconds")
            if ir == "int8":
                out["calibration_images"] = meta.get("calibration_images")
    return out


def _measure(target: _Target, order: list, probe: Probe) -> dict:
    """Time PyTorch fp32 and each candidate of ``order`` on the check images; check agreement."""
    x = probe.check()
    if len(x) == 0:
        return {"candidates": {}, "images": 0}
    figures: dict = {}
    runners: dict = {"torch-fp32": target.module}
    for p in order:
        runner, got = target.load(EngineChoice("openvino", p), probe.calibration)
        if runner is None:
            figures[f"openvino-{p}"] = {"passed": False, "why": got.reason}
        else:
            runners[f"openvino-{p}"] = runner
    timed = _timed(runners, list(torch.split(x, max(1, probe.batch_size))))
    ref, t_ref = timed.pop("torch-fp32")
    figures["torch-fp32"] = {"ms_per_image": round(t_ref * 1e3, 3), "passed": True}
    for tag, (out, t) in timed.items():
        f = probe.agree(ref, out, tag.split("-", 1)[1])
        f["ms_per_image"] = round(t * 1e3, 3)
        if t * MIN_SPEEDUP > t_ref:
            f["faster_than_torch"] = False
        figures[tag] = f
    return {"candidates": figures, "images": int(len(x)), **_ir_facts(target)}


def _winner(figures: dict) -> str:
    ok = {
        t: f["ms_per_image"]
        for t, f in figures.items()
        if f.get("passed") and f.get("faster_than_torch", True) and "ms_per_image" in f
    }
    return min(ok, key=ok.get) if ok else "torch-fp32"


def _describe(rec: dict) -> str:
    """One line: what was chosen, how much faster, how well it agreed, on how many images."""
    figs = rec.get("candidates", {})
    tag = rec["choice"]
    ref = figs.get("torch-fp32", {}).get("ms_per_image")
    parts = []
    for t, f in figs.items():
        if "ms_per_image" not in f:
            parts.append(f"{t} failed ({f.get('why')})")
            continue
        agree = ", ".join(
            f"{k.replace('_', ' ')} {f[k]}"
            for k in ("min_cosine", "zero_shot_top1_agreement", "label_agreement")
            if k in f
        )
        verdict = f"; refused: {f['why']}" if f.get("passed") is False else ""
        parts.append(f"{t} {f['ms_per_image']:.3g} ms/img" + (f" ({agree}{verdict})" if agree or verdict else ""))
    gain = ""
    if tag != "torch-fp32" and ref and figs.get(tag, {}).get("ms_per_image"):
        gain = f", {ref / figs[tag]['ms_per_image']:.2f}x PyTorch fp32"
    on = f"checked on {rec['images']} of your images" if rec.get("images") else "by the speeds measured earlier"
    return (
        f"{tag}{gain} {on} ({rec['cpu']['name']}, {rec['cpu']['isa']}): "
        + "; ".join(parts)
        + (f" -- {rec['note']}" if rec.get("note") else "")
    )


# ----------------------------------------------------------------------------- the choice

_ANNOUNCED: set = set()
MEASUREMENTS = {"count": 0}  # measurements made by this process (tests assert reuse with it)


def _decide(target: _Target, precisions: list, probe: Probe, path: Path):
    """``(record, "")``: measure (or read the speed table), write the choice record and return
    it; ``(None, why)`` when this job is too small to pay for it."""
    spath = speed_file(target.module, target.input_size, target.root)
    speed = _read(spath)
    order, why = _plan(target, precisions, speed, probe.forwards)
    if order is None:
        return None, why
    t0 = time.perf_counter()
    if order:
        MEASUREMENTS["count"] += 1
        rec = _measure(target, order, probe)
    else:
        rec = {"candidates": {t: {"ms_per_image": round(v * 1e3, 3)} for t, v in speed["s_per_image"].items()}}
        rec["images"] = 0
    rec.update(
        choice=_winner(rec["candidates"]) if order else "torch-fp32",
        decided_by="measurement" if order else "speed table",
        note=why or ("" if speed is None else "speeds of this architecture measured earlier"),
        kind=probe.kind,
        cpu=_cpu(),
        precisions=list(precisions),
        seconds=round(time.perf_counter() - t0, 2),
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    table = speed or {"s_per_image": {}, "conversion_seconds": {}, "failed": []}
    if rec["images"]:  # what was measured joins this architecture's speed table
        for t, f in rec["candidates"].items():
            if "ms_per_image" in f:
                table["s_per_image"][t] = f["ms_per_image"] / 1e3
            elif t not in table.setdefault("failed", []):
                table["failed"].append(t)
        table["conversion_seconds"].update({k: v for k, v in rec.get("conversion_seconds", {}).items() if v})
        _write(spath, table)
    # never timed on this architecture (left out as not worth it): a larger job measures them
    rec["not_measured"] = _unmeasured(table, precisions)
    if rec["not_measured"] and order:
        rec["note"] = (
            f"{', '.join(rec['not_measured'])} not measured: not expected to repay its conversion on "
            f"{probe.forwards} forward passes (a larger job measures it)"
        )
    _write(path, rec)
    target.log(f"[engine] auto chose {_describe(rec)}; decided in {rec['seconds']:.1f}s, cached in {path}")
    _ANNOUNCED.add(str(path))
    return rec, ""


def select(
    module: nn.Module,
    identity: dict,
    input_size: tuple,
    choice: EngineChoice,
    probe: Optional[Probe] = None,
    root: Optional[os.PathLike] = None,
    log: Callable[[str], None] = print,
) -> tuple[Optional[engines.EngineModel], EngineChoice]:
    """``(engine model or None for PyTorch, choice)`` for ``choice``: an ``auto`` choice is
    decided here (see the module doc), any other is loaded as :func:`engines.load_engine_model`
    does. The returned choice's ``measured`` holds the decision's figures (store metadata)."""
    calibration = probe.calibration if probe is not None else None
    if choice.engine != "auto":
        return engines.load_engine_model(module, identity, input_size, choice, calibration, root, log=log)
    if probe is None:
        return None, EngineChoice("torch", "fp32", "auto without images to measure on: PyTorch fp32")
    precisions = cpu_isa.candidate_precisions(cpu_isa.cpu_isa(), choice.precision)
    path = choice_file(module, identity, input_size, probe.kind, precisions, root)
    target = _Target(module, identity, tuple(input_size), root, log)
    rec = _read(path)
    if rec is not None and rec.get("not_measured") and _worth_measuring_the_rest(rec, probe.forwards):
        log(f"[engine] auto: measuring again with {', '.join(rec['not_measured'])}: this job is large enough")
        rec = None
    if rec is None:
        try:
            rec, why = _decide(target, precisions, probe, path)
        except Exception as e:  # measuring must never break a job: PyTorch computes the same thing
            why = f"measuring failed ({type(e).__name__}: {str(e).strip()[:200]})"
            engines.warn_once(f"engine auto: {why}; running PyTorch fp32")
            rec = None
        if rec is None:
            if str(path) not in _ANNOUNCED:
                _ANNOUNCED.add(str(path))
                log(f"[engine] auto: PyTorch fp32 for this job: {why}")
            return None, EngineChoice("torch", "fp32", f"auto: {why}")
        return _load(target, rec, probe)
    if str(path) not in _ANNOUNCED:
        _ANNOUNCED.add(str(path))
        log(f"[engine] auto: {_describe(rec)} (measured {rec.get('when')}; cached in {path})")
    runner, picked = _load(target, rec, probe)
    if picked.precision == "int8" and runner is not None and probe.forwards >= SPOT_CHECK_MIN_FORWARDS:
        runner, picked = _spot_check(target, rec, runner, picked, probe)
    return runner, picked


def _worth_measuring_the_rest(rec: dict, forwards: int) -> bool:
    """A choice measured without some candidates (too costly for its job): would this job repay
    measuring them, given the speed-up the measured ones reached?"""
    figs = rec.get("candidates", {})
    ref = figs.get("torch-fp32", {}).get("ms_per_image")
    if not ref:
        return False
    passed = [f["ms_per_image"] for f in figs.values() if f.get("passed") and f.get("ms_per_image")]
    return bool(first_measurement(rec["not_measured"], forwards, measured_speedup=ref / min(passed + [ref]))[0])


def _load(target: _Target, rec: dict, probe: Probe, tag: Optional[str] = None, extra: Optional[dict] = None):
    """Load the engine of ``tag`` (the record's choice by default) with the record as its figures."""
    engine, precision = (tag or rec["choice"]).split("-", 1)
    summary = {k: rec.get(k) for k in ("choice", "decided_by", "images", "calibration_images", "cpu", "when")}
    summary.update(choice=tag or rec["choice"], candidates=rec.get("candidates", {}), **(extra or {}))
    picked = EngineChoice(engine, precision, f"auto: measured on {rec.get('images', 0)} images", measured=summary)
    runner, got = target.load(picked, probe.calibration)
    return runner, (picked if runner is not None or engine == "torch" else got)


def _spot_check(target: _Target, rec: dict, runner, picked: EngineChoice, probe: Probe):
    """int8 was calibrated and checked on the images of an earlier job: check it again on
    :data:`SPOT_CHECK_IMAGES` of this job's (seconds); if they disagree, this job runs the
    fastest other candidate that passed (or PyTorch fp32) and says so."""
    x = probe.check(SPOT_CHECK_IMAGES)
    if len(x) == 0:
        return runner, picked
    got = _timed({"torch-fp32": target.module, "int8": runner}, list(torch.split(x, max(1, probe.batch_size))))
    f = probe.agree(got["torch-fp32"][0], got["int8"][0], "int8")
    f["images"] = int(len(x))
    picked.measured["spot_check"] = f
    if f["passed"]:
        return runner, picked
    other = _winner({t: v for t, v in rec.get("candidates", {}).items() if t != picked.tag})
    target.log(f"[engine] auto: int8 disagrees on {len(x)} of this job's images ({f['why']}): running {other}")
    return _load(target, rec, probe, other, {"spot_check": f, "measured_choice": rec["choice"]})
