"""Inference engines for the forward passes that do not train (no FiftyOne here).

``engine`` is ``auto`` | ``torch`` | ``openvino``; ``precision`` is ``auto`` | ``fp32`` |
``bf16`` | ``fp16`` | ``int8``. :func:`resolve` turns the pair into what actually runs:

* ``auto`` on a CPU with native bf16 (avx512_bf16 / AMX): OpenVINO in bf16 when it is installed
  (``pip install 'fiftyone-nola[openvino]'``; 2.6-3.2x PyTorch fp32 at cosine 0.99995). On other
  CPUs, or without OpenVINO: PyTorch fp32, because OpenVINO fp32 measured at parity with it on an
  AVX2-only CPU (``engine="openvino"`` still runs it there). On CUDA (or MPS): PyTorch with AMP.
* ``int8`` is opt-in only: NNCF post-training quantisation calibrated on a sample of the
  caller's own images (pretrained weights have activation outliers random ones lack, so its
  accuracy must be checked on real weights before it could be a default).
* ``NOLA_ENGINE`` / ``NOLA_PRECISION`` replace ``auto`` process-wide (``NOLA_ENGINE=torch``
  turns the engine off everywhere; the CLI's ``--engine`` sets it).

:func:`load_engine_model` converts a module once (``torch.onnx.export`` with the dynamo
exporter, opset 18, dynamic batch, then ``openvino.convert_model`` of the ONNX file, plus NNCF
for int8) into an OpenVINO IR cached under ``$NOLA_HOME/engines``. The cache key covers the
model identity, a fingerprint of its actual weights, the input size, the IR precision and the
library versions, so any change rebuilds it; entries are written to a temporary folder that is
renamed into place (atomic, shared by concurrent processes). bf16 is an execution hint on the
fp32 IR (no second conversion). Any failure falls back to PyTorch with one warning.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.storage import nola_home

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
FORMAT_VERSION = 1  # bump when the conversion recipe changes: every cached IR is rebuilt
CALIBRATION_IMAGES = 64  # NNCF int8 calibration sample (the measurement used 64 crops)
ONNX_OPSET = 18


class EngineFallbackWarning(RuntimeWarning):
    """The requested engine could not be used; PyTorch runs instead."""


@dataclass(frozen=True)
class EngineChoice:
    """What runs a forward pass: ``engine`` (torch | openvino) at ``precision``."""

    engine: str
    precision: str  # fp32 | bf16 | fp16 | int8
    reason: str = ""

    @property
    def tag(self) -> str:
        return f"{self.engine}-{self.precision}"

    def record(self) -> dict:
        """What a store's metadata keeps about the vectors this choice produced."""
        return {"engine": self.engine, "precision": self.precision, "versions": library_versions(self.engine)}


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
    except Exception:  # ImportError, or a broken install raising anything else
        return False


_BF16: dict = {}


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX); ``NOLA_CPU_BF16=0/1`` overrides."""
    env = os.environ.get("NOLA_CPU_BF16", "").strip().lower()
    if env in {"0", "1", "true", "false", "yes", "no"}:
        return env in {"1", "true", "yes"}
    if "v" not in _BF16:
        flags = ""
        with contextlib.suppress(OSError):
            flags = Path("/proc/cpuinfo").read_text()
        native = "avx512_bf16" in flags or "amx_bf16" in flags
        if not native and openvino_available():
            with contextlib.suppress(Exception):
                caps = _import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
                native = "BF16" in caps
        _BF16["v"] = native
    return _BF16["v"]


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
    if engine == "auto" and not native and precision in ("auto", "fp32"):
        # Measured on an AVX2-only CPU: OpenVINO fp32 does the same arithmetic as PyTorch
        # (1.0-1.3x fewer CPU seconds) and its conversions are not paid back on a first run.
        return EngineChoice("torch", "fp32", "no native bf16: OpenVINO fp32 is at parity with PyTorch")
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


def _convert(
    module: nn.Module, input_size: tuple, ir: str, workdir: Path, calibration: Optional[Callable[[], Iterable]]
) -> dict:
    """Write ``model.xml``/``.bin`` into ``workdir``; return facts for its meta.json."""
    ov = _import_openvino()
    module = module.eval()
    onnx_path = workdir / "model.onnx"
    _export_onnx(module, input_size, onnx_path)
    ov_model = ov.convert_model(str(onnx_path))
    facts: dict = {}
    if ir == "int8":
        import nncf

        if calibration is None:
            raise RuntimeError("int8 needs calibration images and none were given")
        items = _to_batches(calibration())
        if not items:
            raise RuntimeError("int8 calibration got no readable images")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            ov_model = nncf.quantize(
                ov_model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER
            )
        facts["calibration_images"] = len(items)
    ov.save_model(ov_model, str(workdir / "model.xml"), compress_to_fp16=False)
    for p in workdir.iterdir():
        if p.name not in ("model.xml", "model.bin"):
            p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
    return facts


class EngineModel:
    """A converted forward pass: float32 NCHW torch batches in, float32 torch tensors out."""

    def __init__(self, compiled: Any, choice: EngineChoice, path: Path, threads: int):
        self.compiled = compiled
        self.choice = choice
        self.path = path
        self.threads = threads
        self._req = compiled.create_infer_request()

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
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_LOADED: dict = {}
CONVERSIONS = {"count": 0}  # conversions done by this process (tests assert reuse with it)


def clear_loaded() -> None:
    """Forget the compiled models of this process (the on-disk cache stays)."""
    _LOADED.clear()


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
    batches of the user's images (int8 only).
    """
    if choice.engine != "openvino":
        return None, choice
    ir = "int8" if choice.precision == "int8" else "fp32"
    threads = int(threads or default_threads())
    name = _safe(str(identity.get("key") or identity.get("name") or "model"))
    try:
        key = cache_key(identity, tuple(input_size), ir, weights_fingerprint(module))
        if ir == "int8":
            key["calibration"] = getattr(calibration, "fingerprint", None)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        base = cache_root(root)
        path = base / f"{name}-{ir}-{digest}"
        hit = _LOADED.get((str(path), choice.precision, threads))
        if hit is not None:
            return hit, choice
        ov = _import_openvino()
        if not (path / "model.xml").is_file() or not (path / "meta.json").is_file():
            base.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
            try:
                t0 = time.perf_counter()
                CONVERSIONS["count"] += 1
                facts = _convert(module, tuple(input_size), ir, work, calibration)
                seconds = time.perf_counter() - t0
                (work / "meta.json").write_text(
                    json.dumps({**key, **facts, "conversion_seconds": round(seconds, 2)}, indent=2, sort_keys=True)
                )
                for f in work.iterdir():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
                try:
                    os.rename(work, path)  # atomic; another process may have won the race
                except OSError:
                    if not (path / "meta.json").is_file():
                        raise
                log(f"[engine] converted {name} to OpenVINO {ir} in {seconds:.1f}s (once; cached in {path})")
            finally:
                shutil.rmtree(work, ignore_errors=True)
        core = ov.Core()
        ov_model = core.read_model(str(path / "model.xml"))
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if choice.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        compiled = core.compile_model(ov_model, "CPU", config)
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
