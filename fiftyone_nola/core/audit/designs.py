"""Audit sampling designs: who gets audited, with which inclusion probability, reproducibly.

Every design is *Poisson sampling*: pool unit ``i`` gets a uniform key ``u_i`` from the seeded
generator and is audited when ``u_i < pi_i``. The audit's size is random around the ``n`` asked
for (sd about sqrt(n)); in exchange, any part of the pool can be re-sampled *with equal
probability* from the audit alone (keep the audited units with ``u_i < min pi`` over that part),
which is what the exact certificate needs (:mod:`.certify`). The queue order is ``u_i / pi_i``:
the first k audited units of the queue are again (approximately) a Poisson sample.

Designs (``pi`` sums to ``n`` over the pool, clipped to 1):

- ``uniform``: ``pi = n / N``; conditional on its size, a simple random sample.
- ``stratified``: quantile bins of the confidence; per bin ``pi_h`` proportional to the Neyman
  prior ``sqrt(p_h (1 - p_h))`` where ``p_h`` is the bin's mean confidence (the confidences
  taken as the prior guess of the accuracy: no audit exists yet to estimate it), but never
  below a floor ``floor_share * n / N``.
- ``active``: per unit ``pi_i`` proportional to ``sqrt(c_i (1 - c_i))`` (the standard deviation
  of the outcome given a calibrated confidence: the optimal rule of Zrnic & Candes 2024 for a
  mean), with the same floor. It grows with the expected error ``1 - c`` while ``c >= 0.5``;
  below, a label that is almost surely wrong needs little auditing either.

The floor keeps every unit's weight ``1 / pi`` bounded (estimators stay stable) and keeps a flat,
uniform rate over the confident region a certificate is about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from fiftyone_nola.core.errors import InvalidInputError

KINDS = ("uniform", "stratified", "active")
# The defaults the benchmark chose (benchmarks/audit.py): a stratified audit with 80 % of the
# uniform rate as floor needs ~38 % fewer labels than a classical one for the same interval, and
# keeps 80 % of the uniform design's sample for the certificate.
DEFAULT_KIND = "stratified"
FLOOR_SHARE = 0.8
MAX_STRATA = 8
MIN_PER_STRATUM = 20  # audited units per stratum the number of strata aims at
PI_EPS = 1e-12


@dataclass(frozen=True)
class Design:
    """A drawn design, recorded: enough to recompute every unit's inclusion probability."""

    kind: str
    n: int  # expected audit size asked for
    seed: int
    pool_size: int
    floor_share: float = 0.0
    edges: tuple = ()  # inner confidence edges of the strata (len = strata - 1); none if uniform
    stratum_pi: tuple = ()  # stratified: inclusion probability of each stratum
    scale: float = 0.0  # active: pi = clip(max(scale * sqrt(c (1 - c)), floor), 0, 1)
    floor: float = 0.0
    extra: dict = field(default_factory=dict)

    def strata(self, conf: np.ndarray) -> np.ndarray:
        """Confidence stratum of each unit (0 = least confident): the sampling strata of a
        stratified design, the post-strata of an active one's score interval; 0 when uniform."""
        conf = np.asarray(conf, dtype=np.float64)
        if not self.edges:
            return np.zeros(len(conf), dtype=np.int64)
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), conf, side="right").astype(np.int64)

    def inclusion(self, conf: np.ndarray) -> np.ndarray:
        """Inclusion probability of each unit with these confidences."""
        conf = np.asarray(conf, dtype=np.float64)
        if self.kind == "uniform":
            return np.full(len(conf), min(1.0, self.n / max(1, self.pool_size)))
        if self.kind == "stratified":
            return np.asarray(self.stratum_pi, dtype=np.float64)[self.strata(conf)]
        return np.clip(np.maximum(self.scale * _spread(conf), self.floor), 0.0, 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["edges"], d["stratum_pi"] = list(self.edges), list(self.stratum_pi)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Design:
        d = _plain(d)  # a record read back from a database may hold its own dict/list types
        d["edges"], d["stratum_pi"] = tuple(d.get("edges") or ()), tuple(d.get("stratum_pi") or ())
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _spread(p: np.ndarray) -> np.ndarray:
    """sqrt(p (1 - p)): the standard deviation of a 0/1 outcome with mean p."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return np.sqrt(p * (1.0 - p))


def _scaled(size: np.ndarray, weight: np.ndarray, n: float, floor: float) -> tuple[float, np.ndarray]:
    """The scale ``a`` with ``sum(size * clip(max(a * weight, floor), 0, 1)) == n`` and those pi."""

    def total(a: float) -> float:
        return float(np.sum(size * np.clip(np.maximum(a * weight, floor), 0.0, 1.0)))

    if total(0.0) >= n or not np.any(weight > 0):
        return 0.0, np.clip(np.full(len(weight), max(floor, n / max(1.0, float(size.sum())))), 0.0, 1.0)
    lo, hi = 0.0, 1.0
    while total(hi) < n and hi < 1e12:
        hi *= 2.0
    for _ in range(200):  # bisection on a monotone function: exact to float precision
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < n else (lo, mid)
    return hi, np.clip(np.maximum(hi * weight, floor), 0.0, 1.0)


def n_strata(n: int, max_strata: int) -> int:
    """Strata for an audit of ``n``: about ``MIN_PER_STRATUM`` audited units each, 2 to ``max_strata``."""
    return int(np.clip(n // MIN_PER_STRATUM, 2, max(2, max_strata)))


def quantile_edges(conf: np.ndarray, strata: int) -> tuple:
    """Inner edges of ``strata`` equal-count confidence bins (ties kept in one bin)."""
    qs = np.quantile(conf, np.linspace(0, 1, strata + 1)[1:-1], method="higher")
    return tuple(float(x) for x in np.unique(qs) if x > conf.min())


def plan_design(
    conf: np.ndarray,
    n: int,
    kind: str = DEFAULT_KIND,
    seed: int = 0,
    max_strata: int = MAX_STRATA,
    floor_share: float = FLOOR_SHARE,
) -> Design:
    """The design of an audit of about ``n`` units from a pool with these confidences."""
    conf = np.asarray(conf, dtype=np.float64)
    if kind not in KINDS:
        raise InvalidInputError(f"design must be one of {', '.join(KINDS)}, not {kind!r}")
    if not len(conf) or not np.all(np.isfinite(conf)):
        raise InvalidInputError("The pool is empty or has a sample without a confidence")
    if n < 1:
        raise InvalidInputError(f"An audit needs at least one sample, not {n}")
    if not 0.0 <= floor_share <= 1.0:
        raise InvalidInputError(f"floor_share must be in [0, 1], not {floor_share}")
    N = len(conf)
    floor = min(1.0, floor_share * n / N)
    common = dict(n=int(n), seed=int(seed), pool_size=N, floor_share=float(floor_share))
    if kind == "uniform":
        return Design("uniform", **{**common, "floor_share": 1.0})
    if kind == "stratified":
        edges = quantile_edges(conf, n_strata(n, max_strata))
        which = np.searchsorted(np.asarray(edges), conf, side="right")
        size = np.bincount(which, minlength=len(edges) + 1).astype(np.float64)
        prior = np.bincount(which, weights=conf, minlength=len(edges) + 1) / np.maximum(size, 1)
        _, pis = _scaled(size, _spread(prior), n, floor)
        return Design("stratified", **common, edges=edges, stratum_pi=tuple(float(p) for p in pis), floor=floor)
    scale, _ = _scaled(np.ones(N), _spread(conf), n, floor)
    edges = quantile_edges(conf, n_strata(n, max_strata))
    return Design("active", **common, edges=edges, scale=float(scale), floor=floor)


@dataclass
class Draw:
    """Audited units of one or many independent draws (``trial``) from the same pool."""

    unit: np.ndarray  # pool index
    u: np.ndarray  # uniform key (< pi of the unit)
    trial: np.ndarray
    trials: int = 1


def keys(seed: int, pool_size: int) -> np.ndarray:
    """The uniform key of every pool unit, in pool order, from the design's seed."""
    return np.random.default_rng(seed).random(pool_size)


def draw(design: Design, pi: np.ndarray, trials: int = 1, rng: Optional[np.random.Generator] = None) -> Draw:
    """Poisson-sample the pool: one draw from ``design.seed``, or ``trials`` draws from ``rng``."""
    pi = np.asarray(pi, dtype=np.float64)
    if rng is None and trials == 1:
        u = keys(design.seed, len(pi))
        unit = np.flatnonzero(u < pi)
        return Draw(unit, u[unit], np.zeros(len(unit), dtype=np.int64), 1)
    return _many_draws(pi, trials, rng or np.random.default_rng(design.seed))


def _many_draws(pi: np.ndarray, trials: int, rng: np.random.Generator) -> Draw:
    """``trials`` independent Poisson samples, generated unit by unit: the trials that include a
    unit are a Bernoulli process, so its gaps are geometric (a few times the audits' size in random
    numbers instead of trials x pool), and a key given inclusion is uniform below ``pi``."""
    idx = np.flatnonzero(pi > 0)
    p = pi[idx]
    mean = trials * p
    cap = np.ceil(mean + 8 * np.sqrt(mean * (1 - p)) + 8).astype(np.int64)  # gaps to draw per unit
    owner = np.repeat(np.arange(len(idx)), cap)
    # geometric gaps by inversion (numpy's generator draws them one p at a time, slowly)
    q = np.repeat(np.log1p(-np.minimum(p, 1 - 1e-16)), cap)
    gaps = np.maximum(np.ceil(np.log1p(-rng.random(len(q))) / q), 1).astype(np.int64)
    start = np.cumsum(cap) - cap
    pos = np.cumsum(gaps)
    pos -= np.repeat(pos[start] - gaps[start], cap)  # restart the running sum at each unit
    short = pos[start + cap - 1] <= trials  # a unit whose gaps did not pass the last trial (~1e-15)
    if np.any(short):
        raise RuntimeError("simulation sampler: raise the gap margin")  # never seen; fail loudly
    keep = pos <= trials
    unit = idx[owner[keep]]
    trial = pos[keep] - 1
    u = rng.random(len(unit)) * pi[unit]
    return Draw(unit, u, trial.astype(np.int64), trials)


def queue_order(u: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Order of the audited units in the audit queue: increasing ``u / pi``."""
    return np.argsort(np.asarray(u) / np.maximum(np.asarray(pi), PI_EPS), kind="stable")
