"""What this CPU offers for inference: the best instruction set it has, and the engine
candidates that instruction set makes worth measuring (no FiftyOne, no torch here).

``NOLA_CPU_ISA`` replaces the detection (tests simulate every CPU with it; a user can pin a
choice). Detection reads the ``flags`` of ``/proc/cpuinfo``; where that file does not exist
(macOS, Windows) OpenVINO's own capability list tells bf16 apart, else ``generic``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

from fiftyone_nola.core.errors import InvalidInputError

# Worst to best. avx_vnni is VNNI on 256-bit registers (Alder Lake and later client CPUs).
ISAS = ("generic", "avx2", "avx512", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx")
INT8_ISAS = frozenset({"avx_vnni", "avx512_vnni", "avx512_bf16", "amx"})  # VNNI: int8 dot products
BF16_ISAS = frozenset({"avx512_bf16", "amx"})  # bf16 computed natively, not emulated


def isa_from_flags(flags: set[str]) -> str:
    """The best of :data:`ISAS` a CPU with these ``/proc/cpuinfo`` flags has."""
    if flags & {"amx_bf16", "amx_int8", "amx_tile"}:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx_vnni" in flags:
        return "avx_vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


@functools.cache
def _detected() -> tuple[str, str]:
    text = _cpuinfo()
    flags: set[str] = set()
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not name:
            name = value.strip()
    isa = isa_from_flags(flags)
    if not flags:  # no /proc/cpuinfo: ask OpenVINO whether bf16 is native
        with contextlib.suppress(Exception):
            import openvino

            if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                isa = "avx512_bf16"
    return isa, name or platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_isa() -> str:
    """The best instruction set of this CPU (one of :data:`ISAS`); ``NOLA_CPU_ISA`` overrides."""
    env = os.environ.get("NOLA_CPU_ISA", "").strip().lower()
    if env:
        if env not in ISAS:
            raise InvalidInputError(f"NOLA_CPU_ISA must be one of {ISAS}, not {env!r}")
        return env
    return _detected()[0]


def cpu_name() -> str:
    """The CPU's model name (part of what a measured engine choice is cached under)."""
    return _detected()[1]


def candidate_precisions(isa: str, precision: str = "auto") -> list[str]:
    """OpenVINO precisions worth measuring against PyTorch fp32 on a CPU with ``isa``.

    fp32 always; bf16 only where it is native (emulated bf16 is slower than fp32); int8 only
    with VNNI/AMX (without them int8 dot products take several instructions and measured no
    faster than fp32). ``precision="fp32"`` restricts the set to fp32.
    """
    if isa not in ISAS:
        raise InvalidInputError(f"unknown CPU instruction set {isa!r}; known: {ISAS}")
    out = ["fp32"]
    if precision == "auto":
        if isa in BF16_ISAS:
            out.append("bf16")
        if isa in INT8_ISAS:
            out.append("int8")
    return out
