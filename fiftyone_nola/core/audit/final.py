"""Accuracy of what an export will hold: human decisions where made, the model's labels elsewhere.

Assumption (stated in the README): a reviewer's decision is right. The model's labels exported
unreviewed come from a region of the audited pool (all of it, or the certified part); the audit
bounds the number of right labels in that region, and the reviewed units of the region are known
exactly, so the rest is a difference of two counts, one of them known::

    right(exported unreviewed) = right(region) - right(reviewed part of region)

The interval is the audit's interval for the region turned into counts, shifted by what is known,
and clipped to what is possible. Labels exported unreviewed from outside the pool (added or
relabelled after the draw) are unknown: the interval allows anything for them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportCounts:
    """What an export holds, by where its labels come from."""

    human: int  # exported with a reviewer's decision (accepted or corrected): right by assumption
    region: int  # pool units of the region the unreviewed labels come from
    region_reviewed: int  # of those, reviewed since the draw (their labels are the reviewer's)
    region_reviewed_right: int  # of those, where the model's label was right (accepted as is)
    unknown: int = 0  # exported unreviewed from outside the audited pool

    @property
    def unreviewed(self) -> int:
        return self.region - self.region_reviewed

    @property
    def exported(self) -> int:
        return self.human + self.unreviewed + self.unknown


def export_accuracy(counts: ExportCounts, region_estimate: float, region_low: float, region_high: float) -> dict:
    """Estimate and interval of the exported labels' accuracy from the region's audit interval."""
    total = counts.exported
    if total <= 0:
        return {"exported": 0, "estimate": None, "low": None, "high": None}
    unrev = counts.unreviewed

    def right(acc: float) -> float:
        # right labels among the unreviewed part, clipped to [0, its size]
        return min(max(acc * counts.region - counts.region_reviewed_right, 0.0), float(unrev))

    base = counts.human
    return {
        "exported": total,
        "human": counts.human,
        "unreviewed": unrev,
        "unknown": counts.unknown,
        "estimate": (base + right(region_estimate) + 0.5 * counts.unknown) / total,
        "low": (base + right(region_low)) / total,
        "high": (base + right(region_high) + counts.unknown) / total,
    }
