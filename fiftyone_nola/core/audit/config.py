"""The audit's settings in one place (library, CLI and App read their defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fiftyone_nola.core.audit.designs import DEFAULT_KIND, FLOOR_SHARE, KINDS, MAX_STRATA
from fiftyone_nola.core.errors import InvalidInputError

METHODS = ("exact", "stratified", "ppi", "ppi_calibrated", "active")  # estimators (fiftyone_nola.core.audit.estimators)


@dataclass(frozen=True)
class AuditConfig:
    """How to draw an audit and what to conclude from it.

    ``design``: ``stratified`` (default, chosen by the benchmark), ``uniform`` or ``active``;
    ``floor_share``: every unit's inclusion probability is at least this share of the uniform
    rate; ``max_strata``: confidence strata (fewer for small audits, ~20 audited each);
    ``method``: the estimator (None: the design's own: stratified / ppi / active);
    ``alpha``: intervals are (1 - alpha); ``target`` and ``delta``: the certificate says the
    labels at or above its threshold are at least ``target`` accurate with probability >= 1 - delta.
    """

    design: str = DEFAULT_KIND
    floor_share: float = FLOOR_SHARE
    max_strata: int = MAX_STRATA
    method: Optional[str] = None
    alpha: float = 0.05
    target: float = 0.95
    delta: float = 0.05

    def __post_init__(self):
        if self.design not in KINDS:
            raise InvalidInputError(f"design must be one of {', '.join(KINDS)}, not {self.design!r}")
        if self.method is not None and self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        for name in ("alpha", "target", "delta"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise InvalidInputError(f"{name} must be between 0 and 1 (exclusive), not {v}")
        if not 0.0 < self.floor_share <= 1.0:
            raise InvalidInputError(f"floor_share must be in (0, 1], not {self.floor_share}")
        if self.max_strata < 1:
            raise InvalidInputError(f"max_strata must be at least 1, not {self.max_strata}")
