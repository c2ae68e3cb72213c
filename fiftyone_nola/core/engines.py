"""Inference engines for the forward passes that do not train (no FiftyOne here).

``engine`` is ``auto`` | ``torch`` | ``openvino``; ``precision`` is ``auto`` | ``fp32`` |
``bf16`` | ``fp16`` | ``int8``. :func:`resolve` turns the pair into what runs:

* ``auto`` on a CPU with OpenVINO installed (``pip install 'fiftyone-nola[openvino]'``): decided
  by measurement on the caller's own images (:mod:`fiftyone_nola.core.engine_choice`): PyTorch
  fp32, OpenVINO fp32, bf16 where the CPU has it natively and int8 where it has VNNI/AMX
  (:mod:`fiftyone_nola.core.cpu_isa`), the fastest that agrees with PyTorch fp32. Without
  OpenVINO: PyTorch fp32. On CUDA (or MPS): PyTorch with AMP.
* An explicit precision is obeyed without measurement (``int8``: NNCF post-training
  quantisation calibrated on a sample of the caller's images; ``bf16`` runs fp32, with a
  warning, on CPUs without native bf16).
* ``NOLA_ENGINE`` / ``NOLA_PRECISION`` replace ``auto`` process-wide (``NOLA_ENGINE=torch``
  turns the engine off everywhere; the CLI's ``--engine`` sets it).

:func:`load_engine_model` converts a module once (``torch.onnx.export`` with the dynamo
exporter, opset 18, dynamic batch, then ``openvino.convert_model`` of the ONNX file; int8 is
NNCF applied to that fp32 IR) into an OpenVINO IR cached under ``$NOLA_HOME/engines``. The
cache key covers the model identity, a fingerprint of its actual weights, the input size, the
IR precision and the library versions, so any change rebuilds it; entries are written to a
temporary folder that is renamed into place (atomic, shared by concurrent processes). An int8
IR is calibrated once per model, on the images of the first job that needs it (recorded in its
``meta.json``), not once per dataset. bf16 is an execution hint on the fp32 IR. Any failure
falls back to PyTorch with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core import cpu_isa as isa
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.storage import nola_home

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
FORMAT_VERSION = 2  # bump when the conversion recipe changes: every cached IR is rebuilt
CALIBRATION_IMAGES = 64  # NNCF int8 calibration sample (the measurement used 64 crops)
ONNX_OPSET = 18


class EngineFallbackWarning(RuntimeWarning):
    """The requested engine could not be used; PyTorch runs instead."""


@dataclass(frozen=True)
class EngineChoice:
    """What runs a forward pass: ``engine`` (torch | openvino) at ``precision``; ``auto``
    (engine and precision) until :func:`engine_choice.select` has measured; ``measured`` holds
    that measurement (choice, figures, image count) when it decided."""

    engine: str
    precision: str  # fp32 | bf16 | fp16 | int8 (auto | fp32 for an engine="auto" to measure)
    reason: str = ""
    measured: Optional[dict] = field(default=None, compare=False, hash=False)

    @property
    def tag(self) -> str:
        return f"{self.engine}-{self.precision}"

    def record(self) -> dict:
        """What a store's metadata keeps about the vectors this choice produced."""
        out = {"engine": self.engine, "precision": self.precision, "versions": library_versions(self.engine)}
        if self.measured is not None:
            out["auto"] = self.measured
        return out


# ----------------------------------------------------------------------------- availability


def _import_openvino():
    """``import openvino`` (a separate function so tests can simulate its absence)."""
    import openvino

    return openvino


def openvino_available() -> bool:
    """Whether ``import openvino`` works here."""
    try:
        _import_openvino()
        return True
    except Exception as e:  # ImportError, or a broken install raising anything else
        logger.debug("OpenVINO is not usable here: %s: %s", type(e).__name__, e)
        return False


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX; ``NOLA_CPU_ISA`` overrides)."""
    return isa.cpu_isa() in isa.BF16_ISAS


def library_versions(engine: str = "openvino") -> dict:
    """Versions that change what a converted model computes (part of its cache key)."""
    return dict(_library_versions(engine))


@functools.cache
def _library_versions(engine: str) -> tuple:
    import importlib.metadata as md

    names = ["torch"] + (
        ["openvino", "nncf", "onnx", "onnxscript", "open_clip_torch", "timm"] if engine == "openvino" else []
    )
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return tuple(out.items())


# ----------------------------------------------------------------------------- choice


def check_settings(engine: str, precision: str) -> None:
    """Refuse unknown ``engine`` / ``precision`` values with the accepted ones."""
    if engine not in ENGINES:
        raise InvalidInputError(f"engine must be one of {ENGINES}, not {engine!r}")
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {PRECISIONS}, not {precision!r}")


_WARNED: set = set()


def warn_once(message: str) -> None:
    """One :class:`EngineFallbackWarning` per distinct message and process."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, EngineFallbackWarning, stacklevel=3)
    logger.warning(message)


def _torch_precision(device: torch.device, precision: str) -> str:
    if precision in ("fp32", "bf16", "fp16"):
        return precision
    if device.type == "cuda":  # auto: AMP as device.amp_dtype decides
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve(engine: str = "auto", precision: str = "auto", device="cpu") -> EngineChoice:
    """What runs a non-training forward pass for these settings on ``device`` (see module doc)."""
    engine = os.environ.get("NOLA_ENGINE", "auto") if engine == "auto" else engine
    precision = os.environ.get("NOLA_PRECISION", "auto") if precision == "auto" else precision
    check_settings(engine, precision)
    device = torch.device(device)
    if device.type != "cpu":
        if engine == "openvino":
            raise InvalidInputError(
                f"engine='openvino' runs on the CPU but device is {device.type}; use engine='auto' "
                f"(PyTorch on {device.type}) or device='cpu'"
            )
        if precision == "int8":
            raise InvalidInputError("precision='int8' needs engine='openvino' on a CPU (device='cpu')")
        return EngineChoice("torch", _torch_precision(device, precision), f"PyTorch on {device.type}")
    if engine == "torch":
        if precision == "int8":
            raise InvalidInputError(
                "precision='int8' needs engine='openvino' (or 'auto'); PyTorch runs fp32, bf16 or fp16"
            )
        return EngineChoice("torch", _torch_precision(device, precision), "engine='torch' requested")
    if precision == "fp16":
        if engine == "openvino":
            raise InvalidInputError("OpenVINO on a CPU runs fp32, bf16 or int8, not fp16")
        return EngineChoice("torch", "fp16", "fp16 autocast requested (PyTorch)")
    if not openvino_available():
        if engine == "openvino" or precision == "int8":
            warn_once(
                "OpenVINO is not installed (pip install 'fiftyone-nola[openvino]'): "
                f"running PyTorch fp32 instead of OpenVINO {precision}"
            )
            return EngineChoice("torch", "fp32", "OpenVINO not installed")
        return EngineChoice("torch", _torch_precision(device, precision), "OpenVINO not installed")
    native = cpu_native_bf16()
    if precision == "bf16" and not native:
        warn_once("This CPU has no native bf16 (avx512_bf16/AMX): running fp32 instead")
        precision = "fp32"
    if engine == "auto" and precision in ("auto", "fp32"):
        return EngineChoice("auto", precision, "measured on the caller's images (core/engine_choice.py)")
    if precision == "auto":
        precision = "bf16" if native else "fp32"
    return EngineChoice("openvino", precision, "OpenVINO on a CPU")


def torch_amp(choice: EngineChoice) -> Optional[torch.dtype]:
    """The autocast dtype of a PyTorch choice (None: fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice.precision)


# ----------------------------------------------------------------------------- conversion


class Forward(nn.Module):
    """``fn`` as a module whose parameters are ``owner``'s (what the exporter traces)."""

    def __init__(self, owner: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


FULL_HASH_MAX = 1 << 18  # tensors up to this many elements are hashed whole
SAMPLES_PER_TENSOR = 1 << 12


def weights_fingerprint(module: nn.Module) -> str:
    """Identity of a module's actual tensors: names, shapes, dtypes and their bytes (small
    tensors whole, e.g. every LayerNorm and prompt; large ones at 4,096 evenly strided
    positions plus their first 1,024 values).

    Milliseconds for a ViT-B, exact (no float sums that could differ between processes), and
    any realistic weight change (another checkpoint, tuning) changes it, so a converted model is
    never reused for other weights even if the caller's identity missed it.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() > FULL_HASH_MAX:
                step = t.numel() // SAMPLES_PER_TENSOR
                t = torch.cat([t[:1024], t[::step]])
            if t.dtype == torch.bfloat16:
                t = t.float()
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_root(root: Optional[os.PathLike] = None) -> Path:
    """Where converted models are cached: ``root``, else ``$NOLA_HOME/engines``."""
    if root is not None:
        return Path(root)

    return nola_home() / "engines"


def cache_key(identity: dict, input_size: tuple, ir: str, fingerprint: str) -> dict:
    """Everything a converted model depends on; hashed into its cache folder's name."""
    return {
        "format": FORMAT_VERSION,
        "identity": json.loads(json.dumps(identity, sort_keys=True, default=str)),
        "input": [int(s) for s in input_size],
        "ir": ir,
        "weights": fingerprint,
        "versions": library_versions("openvino"),
    }


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:80]


def _export_onnx(module: nn.Module, input_size: tuple, path: Path) -> None:
    x = torch.zeros((2, *input_size), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=True,
            opset_version=ONNX_OPSET,
            dynamic_shapes=({0: batch},),
            input_names=["x"],
            output_names=["y"],
            external_data=True,
            verbose=False,
        )


def _to_batches(calibration: Iterable) -> list[np.ndarray]:
    out = []
    for b in calibration:
        a = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
        a = np.ascontiguousarray(a, dtype=np.float32)
        out.extend(a[i : i + 1] for i in range(len(a)))
    return out


def _convert_fp32(module: nn.Module, input_size: tuple, workdir: Path) -> dict:
    """Write the fp32 ``model.xml``/``.bin`` of ``module`` into ``workdir``."""
    ov = _import_openvino()
    onnx_path = workdir / "model.onnx"
    _export_onnx(module.eval(), input_size, onnx_path)
    ov.save_model(ov.convert_model(str(onnx_path)), str(workdir / "model.xml"), compress_to_fp16=False)
    return {}


def _quantize(fp32_dir: Path, workdir: Path, calibration: Optional[Callable[[], Iterable]]) -> dict:
    """Write the int8 IR of the fp32 IR in ``fp32_dir`` (NNCF, calibrated on ``calibration()``)."""
    import nncf

    ov = _import_openvino()
    if calibration is None:
        raise RuntimeError("int8 needs calibration images and none were given")
    items = _to_batches(calibration())
    if not items:
        raise RuntimeError("int8 calibration got no readable images")
    model = ov.Core().read_model(str(fp32_dir / "model.xml"))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(model, str(workdir / "model.xml"), compress_to_fp16=False)
    return {
        "calibration_images": len(items),
        "calibration": getattr(calibration, "fingerprint", None),  # which images (not part of the key)
    }


def _build(path: Path, key: dict, make: Callable[[Path], dict], log: Callable[[str], None], name: str) -> None:
    """Create the cache entry ``path`` with ``make(workdir)`` unless it exists (atomic rename)."""
    if (path / "model.xml").is_file() and (path / "meta.json").is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        t0 = time.perf_counter()
        CONVERSIONS["count"] += 1
        facts = make(work)
        seconds = time.perf_counter() - t0
        for p in work.iterdir():
            if p.name not in ("model.xml", "model.bin"):
                p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        meta = {**key, **facts, "conversion_seconds": round(seconds, 2)}
        (work / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in work.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(work, path)  # atomic; another process may have won the race
        except OSError:
            if not (path / "meta.json").is_file():
                raise
        log(f"[engine] converted {name} to OpenVINO {key['ir']} in {seconds:.1f}s (once; cached in {path})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


class EngineModel:
    """A converted forward pass: float32 NCHW torch batches in, float32 torch tensors out."""

    def __init__(self, compiled: Any, choice: EngineChoice, path: Path, threads: int):
        self.compiled = compiled
        self.choice = choice
        self.path = path
        self.threads = threads
        self._req = compiled.create_infer_request()

    @property
    def meta(self) -> dict:
        """The cache entry's ``meta.json`` (key, calibration, conversion seconds)."""
        return json.loads((self.path / "meta.json").read_text())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        self._req.infer({0: a})
        return torch.from_numpy(np.array(self._req.get_output_tensor(0).data, dtype=np.float32))


def default_threads() -> int:
    """Inference threads: every core this process may use (decode workers are separate
    processes that mostly wait on the inference; ``NOLA_ENGINE_THREADS`` overrides)."""
    env = os.environ.get("NOLA_ENGINE_THREADS")
    if env:
        return max(1, int(env))
    return isa.usable_cores()


_LOADED: dict = {}
CONVERSIONS = {"count": 0}  # conversions done by this process (tests assert reuse with it)


def clear_loaded() -> None:
    """Forget the compiled models of this process (the on-disk cache stays)."""
    _LOADED.clear()


def entry_path(module: nn.Module, identity: dict, input_size: tuple, ir: str, root=None) -> tuple[Path, dict]:
    """``(cache folder, key)`` of ``module``'s converted model at IR precision ``ir`` (fp32 | int8)."""
    key = cache_key(identity, tuple(input_size), ir, weights_fingerprint(module))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = _safe(str(identity.get("key") or identity.get("name") or "model"))
    return cache_root(root) / f"{name}-{ir}-{digest}", key


def load_engine_model(
    module: nn.Module,
    identity: dict,
    input_size: tuple,
    choice: EngineChoice,
    calibration: Optional[Callable[[], Iterable]] = None,
    root: Optional[os.PathLike] = None,
    threads: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> tuple[Optional[EngineModel], EngineChoice]:
    """``(engine model, choice)`` for ``choice``; ``(None, PyTorch fp32 choice)`` when the engine
    cannot run it (one :class:`EngineFallbackWarning`), ``(None, choice)`` for PyTorch choices.

    ``module(x)`` for ``x`` of shape ``(N, *input_size)`` is what gets converted; ``identity``
    names it (model key, weights id, tuned model id...); ``calibration()`` yields preprocessed
    batches of the user's images (int8 only, the first time its IR is built).
    """
    if choice.engine != "openvino":
        return None, choice
    ir = "int8" if choice.precision == "int8" else "fp32"
    threads = int(threads or default_threads())
    name = _safe(str(identity.get("key") or identity.get("name") or "model"))
    try:
        fp32_path, fp32_key = entry_path(module, identity, input_size, "fp32", root)
        path, key = (fp32_path, fp32_key) if ir == "fp32" else entry_path(module, identity, input_size, ir, root)
        hit = _LOADED.get((str(path), choice.precision, threads))
        if hit is not None:
            return hit, choice
        ov = _import_openvino()
        _build(fp32_path, fp32_key, lambda work: _convert_fp32(module, tuple(input_size), work), log, name)
        if ir == "int8":
            _build(path, key, lambda work: _quantize(fp32_path, work, calibration), log, name)
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if choice.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path / "model.xml")), "CPU", config)
        model = EngineModel(compiled, choice, path, threads)
        _LOADED[(str(path), choice.precision, threads)] = model
        return model, choice
    except Exception as e:  # never a crash: PyTorch computes the same thing
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        warn_once(
            f"OpenVINO {choice.precision} is unavailable for {name} ({type(e).__name__}: "
            f"{first}); running PyTorch fp32 instead"
        )
        return None, EngineChoice("torch", "fp32", f"OpenVINO failed: {type(e).__name__}")
