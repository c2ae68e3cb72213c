"""Problems, the report of a validation pass, and how both are printed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from fiftyone_nola.core.errors import ValidationError


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


def _problem(input_: str, message: str, fix: str = "", error: bool = True) -> Problem:
    return Problem(input_, message, fix, error)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def plan_lines(plan: dict) -> list[str]:
    """The plan as printed by ``--check``."""
    lines = [
        f"plan: {plan.get('samples', 0)} samples"
        + (f" ({plan['new_samples']} new)" if plan.get("new_samples") else "")
        + (f", {plan['classes']} classes" if plan.get("classes") else "")
    ]
    for s in plan.get("stages", []):
        extra = f"  [{s['detail']}]" if s.get("detail") else ""
        lines.append(
            f"  {s['stage']:<16} {s['action']:<12} {s['samples']:>8} samples  ~{_duration(s['seconds'])}{extra}"
        )
    lines.append(f"estimated time: ~{_duration(plan.get('seconds', 0.0))} on {plan.get('hardware', '?')}")
    lines.append(f"disk for the stores: ~{_human(plan.get('disk_bytes', 0))} under {plan.get('storage')}")
    return lines


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
