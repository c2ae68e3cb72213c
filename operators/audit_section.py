"""The NoLA panel's Audit mode: draw a random audit, walk it in the sample view (one click per
sample, as the review queue), and read how accurate the labels are, per class and against the
confidence threshold with the certified lower bound; flag what the certificate does not cover.
Thin: each callback calls one function of :mod:`fiftyone_nola.stages.audit`."""

from __future__ import annotations

import fiftyone.operators.types as types

from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.stages import audit
from fiftyone_nola.stages import review as rv

from ._panel_common import _open_in_sample_view, _show, field_of

AUDIT_DRAW = 200  # the form's suggestion: enough for +-0.03..0.05 at 95 % (README, "How accurate...")


def audit_view(dataset):
    """The audit's samples nobody decided yet (the grid while auditing)."""
    return dataset.match_tags(audit.AUDIT_TAG).match_tags(list(rv.DECIDED_TAGS), bool=False)


def report_state(dataset) -> dict:
    """What the Audit mode shows: progress, and once samples are decided, the report."""
    if not dataset.has_sample_field(audit.rec.KEY_FIELD) or not audit.rec.recorded(dataset):
        return {"drawn": 0}
    progress = audit.audit_progress(dataset)
    out = {**progress}
    if progress["audited"]:
        r = audit.audit_report(dataset)
        out.update(
            {k: r[k] for k in ("accuracy", "accuracy_low", "accuracy_high", "threshold", "certified", "uncertified")}
        )
        out.update(
            statement=r["certificate"],
            target=r["target"],
            delta=r["delta"],
            alpha=r["alpha"],
            pool=r["pool"],
            counted=r["progress"]["counted"],
            note=r.get("note"),
            per_class=[
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()} for row in r["per_class"]
            ],
            curve=r["curve"],
        )
    return out


def curve_traces(curve: list, target: float) -> list:
    """Accuracy against the confidence threshold: the estimate and its interval, the certified
    lower bound, the target, and how many samples lie at or above each threshold (right axis)."""
    x = [p["threshold"] for p in curve]
    return [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "interval",
            "x": x,
            "y": [p["high"] for p in curve],
            "line": {"width": 0},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "interval",
            "x": x,
            "y": [p["low"] for p in curve],
            "fill": "tonexty",
            "line": {"width": 0},
            "fillcolor": "rgba(108,142,191,0.3)",
        },
        {"type": "scatter", "mode": "lines", "name": "accuracy", "x": x, "y": [p["accuracy"] for p in curve]},
        {
            "type": "scatter",
            "mode": "lines",
            "name": "certified lower bound",
            "x": x,
            "y": [p["certified_lower_bound"] for p in curve],
            "line": {"dash": "dash", "color": "#e0562f"},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "target",
            "x": [0, 1],
            "y": [target, target],
            "line": {"dash": "dot"},
        },
        {
            "type": "bar",
            "name": "samples at or above",
            "x": x,
            "y": [p["above"] for p in curve],
            "yaxis": "y2",
            "opacity": 0.25,
        },
    ]


def _progress_text(a: dict) -> str:
    """Kept in the panel's state (see panels.py: a text rendered from an older event's state goes stale)."""
    if not a.get("drawn"):
        return ""
    return f"Audit progress: **{a['audited']} / {a['drawn']}** decided ({a['drawn'] - a['audited']} left)"


class AuditSection:
    """Mixin of the NoLA panel: the Audit mode's callbacks and layout."""

    def _refresh_audit(self, ctx) -> None:
        st = report_state(ctx.dataset)
        ctx.panel.set_state(
            {"audit": {k: v for k, v in st.items() if k != "curve"}, "audit_progress": _progress_text(st)}
        )
        if st.get("curve"):
            ctx.panel.set_data("audit_curve", curve_traces(st["curve"], st["target"]))

    def on_mode(self, ctx):
        ctx.panel.set_state("mode", ctx.params.get("value") or "review")
        self.refresh(ctx)

    def on_audit_n(self, ctx):
        v = ctx.params.get("value")
        if v is not None:
            ctx.panel.set_state("audit_n", int(v))

    def on_audit_draw(self, ctx):
        n = int(ctx.panel.get_state("audit_n") or AUDIT_DRAW)
        try:
            out = audit.draw_audit(ctx.dataset, n, field_of(ctx), replace_existing=True)
        except NolaError as e:
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.ops.notify(
            f"{out['drawn']} samples drawn for audit from {out['pool']} undecided ({out['design']} design)",
            variant="success",
        )
        self.refresh(ctx)
        _show(ctx, audit_view(ctx.dataset))

    def on_audit_start(self, ctx):
        """Grid to the undecided audit samples, the first (in audit order) opened in the sample view."""
        queue = audit.audit_queue(ctx.dataset)
        if not queue:
            ctx.ops.notify("Every drawn sample is decided: draw again for a larger audit", variant="info")
            return
        _open_in_sample_view(ctx, audit_view(ctx.dataset), queue[0])

    def on_flag_uncertified(self, ctx):
        out = audit.flag_uncertified(ctx.dataset, field_of(ctx))
        ctx.ops.notify(out["message"], variant="success")
        ctx.panel.set_state("mode", "review")
        self.refresh(ctx)
        _show(ctx, rv.queue_view(ctx.dataset))

    def _render_audit(self, ctx, panel, st) -> None:
        a = st.audit or {}
        panel.md(
            "**How accurate are the labels?** A random sample, decided like any review, estimates the "
            "accuracy with a valid interval and certifies a confidence threshold above which labels may "
            "be exported unseen.",
            name="audit_intro",
        )
        row = panel.h_stack("audit_draw_row", gap=2, align_y="center")
        row.int(
            "audit_n",
            default=int(st.audit_n or AUDIT_DRAW),
            min=1,
            label="Samples to draw",
            on_change=self.on_audit_n,
            view=types.FieldView(space=3),
        )
        row.btn(
            "audit_draw",
            label="Draw for audit" if not a.get("drawn") else "Draw a new audit",
            icon="casino",
            on_click=self.on_audit_draw,
            variant="outlined" if a.get("drawn") else "contained",
        )
        if not a.get("drawn"):
            return
        remaining = a["drawn"] - a["audited"]
        panel.md(st.audit_progress or _progress_text(a), name="audit_progress")
        panel.btn(
            "audit_start",
            label="Audit the drawn samples",
            icon="fact_check",
            variant="contained",
            on_click=self.on_audit_start,
            disabled=not remaining,
        )
        if a.get("accuracy") is not None:
            self._render_estimate(panel, a)

    def _render_estimate(self, panel, a: dict) -> None:
        conf = round(100 * (1 - a["alpha"]))
        panel.md(
            f"Accuracy **{a['accuracy']:.3f}** [{a['accuracy_low']:.3f}, {a['accuracy_high']:.3f}] ({conf} % "
            f"interval) from {a['counted']} audited of {a['pool']} labels.  \n{a['statement']}"
            + (f"  \n_{a['note']}_" if a.get("note") else ""),
            name="audit_estimate",
        )
        panel.md(
            "**Accuracy at or above a confidence threshold** (band: interval; dashed: certified lower bound; "
            "dotted: target; bars: samples at or above, right axis)",
            name="audit_curve_title",
        )
        panel.plot(
            "audit_curve",
            layout={
                "height": 260,
                "margin": {"t": 30, "b": 40, "l": 40, "r": 40},
                "xaxis": {"range": [0, 1], "title": "confidence threshold"},
                "yaxis": {"range": [0, 1]},
                "yaxis2": {"overlaying": "y", "side": "right", "showgrid": False},
                "showlegend": False,
            },
            config={"displayModeBar": False},
        )
        table = types.TableView()
        for key, label in (
            ("class", "Class"),
            ("audited", "Audited"),
            ("accuracy", "Accuracy"),
            ("low", "Low"),
            ("high", "High"),
        ):
            table.add_column(key, label=label)
        panel.list("audit_classes", types.Object(), view=table, default=a.get("per_class") or [])
        panel.btn(
            "flag_uncertified",
            label=f"Flag the uncertified ({a['uncertified']}) for review",
            icon="flag",
            on_click=self.on_flag_uncertified,
        )
