"""When ``engine="auto"`` should measure at all: a first measurement's cost against what the
job would save, before anything is measured on this CPU (no FiftyOne, no torch).

Costs and speed-ups are priors in units of PyTorch fp32 forward passes of one image
(:data:`PRIOR_SPEEDUP`, :data:`PRIOR_CONVERSION_FORWARDS`, measured on the CPUs named there), so
nothing needs timing before the decision. The choices are: nothing, the candidates sharing the
fp32 IR (fp32, bf16), or those and int8 (a second conversion with calibration); the one expected
to save the most beyond :data:`PAY_BACK_MARGIN` times its cost is measured.
``NOLA_ENGINE_MIN_IMAGES`` replaces the rule (every candidate, from that many forward passes).
"""

from __future__ import annotations

import os
from typing import Optional

from fiftyone_nola.core import cpu_isa

CHECK_IMAGES = 128  # images (or crops) the agreement check and the timing run on
# A first measurement's costs and gains before anything is measured on this CPU, in PyTorch fp32
# forward passes of one image. Measured (ViT-B/32, ViT-S/16 and the tuned ViT-B/32; Intel Xeon
# with AMX): OpenVINO fp32 0.98-1.23x PyTorch, bf16 3.2-4.6x, int8 3.8-4.8x; the fp32 IR costs
# 160-330 forward passes to build, int8 250-535 more. AMD EPYC (AVX2): OpenVINO fp32 1.37-1.5x.
# Xeon with avx512_vnni and no bf16: int8's model 3-4x OpenVINO fp32. Without AMX, bf16 runs on
# AVX-512 dot products (about twice fp32's) and int8 on VNNI.
PRIOR_SPEEDUP = {"fp32": 1.2, "bf16": 2.0, "int8": 2.5, "bf16_amx": 3.2, "int8_amx": 3.8}
PRIOR_CONVERSION_FORWARDS = {"fp32": 300, "int8": 500}
PRIOR_COMPILE_FORWARDS = 50  # compiling one candidate for this CPU, per candidate
# The priors are medians of a few models and CPUs: a first measurement must be expected to save
# this many times its cost, so a job near break-even does not pay for an uncertain one.
PAY_BACK_MARGIN = 1.25
PREFERENCE = ("int8", "bf16", "fp32")  # measuring order without a speed table: expected fastest first


def _prior_speedup(precision: str) -> float:
    amx = precision != "fp32" and cpu_isa.cpu_isa() == "amx"
    return PRIOR_SPEEDUP[f"{precision}_amx" if amx else precision]


def first_measurement(precisions: list, forwards: int, measured_speedup: Optional[float] = None) -> tuple[list, str]:
    """``(precisions to measure, why)`` for a job of ``forwards`` forward passes with no speed
    table; ``[]`` when no measurement is expected to pay back (``why`` says so).

    The choices are: nothing, the candidates on the fp32 IR (fp32, bf16), or those and int8 (a
    second conversion). Each one's expected saving is ``forwards * (1 - 1 / speed-up)``, its cost
    the conversions, compilations and check passes, all in PyTorch forward passes (the priors);
    the one saving most beyond :data:`PAY_BACK_MARGIN` times its cost is measured.
    ``measured_speedup``: a cached choice, measured without int8, reached this speed-up; then
    the choice is between it and measuring again with int8 (only the int8 IR is new).
    """
    env = os.environ.get("NOLA_ENGINE_MIN_IMAGES", "").strip()
    if env:
        if forwards >= int(env):
            return [p for p in PREFERENCE if p in precisions], ""
        return [], f"{forwards} forward passes are fewer than NOLA_ENGINE_MIN_IMAGES={env}"
    on_fp32_ir = [p for p in precisions if p != "int8"]
    levels = [on_fp32_ir, precisions] if "int8" in precisions else [on_fp32_ir]
    base = 1.0
    if measured_speedup is not None:
        levels, base = [precisions], measured_speedup
    best_net, best_need, take = 0.0, float("inf"), []
    for level in levels:
        speedup = max(base, *(_prior_speedup(p) for p in level))
        cost = CHECK_IMAGES * (1 + sum(1 / _prior_speedup(p) for p in level)) + PRIOR_COMPILE_FORWARDS * len(level)
        cost += PRIOR_CONVERSION_FORWARDS["int8"] if "int8" in level else 0
        cost += PRIOR_CONVERSION_FORWARDS["fp32"] if measured_speedup is None else 0
        per_forward = 1 / base - 1 / speedup
        if per_forward <= 0:
            continue
        best_need = min(best_need, PAY_BACK_MARGIN * cost / per_forward)
        net = forwards * per_forward - PAY_BACK_MARGIN * cost
        if net > best_net:
            best_net, take = net, level
    if not take:
        what = "int8" if measured_speedup is not None else "the engines"
        need = f"expected from about {best_need:.0f}" if best_need < float("inf") else "none expected faster"
        return [], (
            f"{forwards} forward passes are too few to pay for measuring {what} on this CPU "
            f"({need}; NOLA_ENGINE_MIN_IMAGES=0 measures anyway)"
        )
    return [p for p in PREFERENCE if p in take], ""
