"""The NoLA review workspace docked beside the grid: stages and their progress, per-class
table, confidence histogram with a live threshold, review buttons acting on the selection.
Thin: each callback reads the panel state / App context, calls one function of
:mod:`fiftyone_nola.stages.review`, and writes what it returns back to the panel.
The sample-view panel is in :mod:`operators.sample_panel`.
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.stages import review as rv
from fiftyone_nola.stages import review_stages as rs

from . import _common
from ._panel_common import (  # noqa: F401 - MODEL_EVALUATION_PANEL and model_evaluation_button are used by importers
    _ECHOES,
    _MEMO,
    DEFAULT_FIELD,
    MODEL_EVALUATION_PANEL,
    PLUGIN,
    Serialized,
    _has_predictions,
    _histogram_traces,
    _open_in_sample_view,
    _show,
    _targets,
    _threshold,
    field_of,
    media_url,
    model_evaluation_button,
)
from .audit_section import AuditSection

SLIDER, NUMBER = "threshold", "threshold_value"  # the two threshold controls
POLL_MS = 2000
MIN_SIMILARITY = _common.arg_default(rv.propagate_corrections, "min_similarity")


class NolaPanel(Serialized, AuditSection, foo.Panel):
    """Stages, per-class table, confidence histogram with a live threshold, review buttons."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="nola_panel",
            label="NoLA review",
            icon="fact_check",
            surfaces="grid",
            help_markdown="Auto-labels with NoLA and reviews the doubtful ones: move the threshold, click a "
            "class to filter the grid, act on the selection, review the queue in the sample view.",
        )

    # ------------------------------------------------------------------ events

    def on_load(self, ctx):
        """Show the dataset as it is: opening the panel (or reloading the page) writes nothing."""
        self.refresh(ctx)

    def on_change_dataset(self, ctx):
        self.refresh(ctx)

    def on_change_current_sample(self, ctx):
        """The sample view closed (or moved on): decisions made there show here at once."""
        if not ctx.current_sample:
            self.refresh(ctx)

    def execute(self, ctx):
        # Outside Audit mode a view change changes nothing here (on_change_view): answered at once,
        # neither waiting for the panel's other events nor rendering, since the App sends up to
        # four per page load and each, serialized and rendered, held a threshold move's own
        # event back by 0.1-0.3 s at 100,000 samples.
        if ctx.params.get("__method__") == "on_change_view" and ctx.panel.get_state("mode") != "audit":
            return None
        return super().execute(ctx)

    def on_change_view(self, ctx):
        """The grid's view changed: set from here, by the person, or put back by the App with the
        panel's older state (after *Draw for audit*, in 1 browser run of 7: the full grid and the
        Draw form came back). In Audit mode the audit is shown as the dataset has it, which undoes
        the latter. Outside Audit mode it is not called (see :meth:`execute`): the App sends up to four of these per
        page load (one per view, view name, filters and extended stages), ahead of a threshold
        move's own event, and a refresh each delayed the move by 0.2-0.5 s at 100,000 samples."""
        self._refresh_audit(ctx)

    def on_change_selected(self, ctx):
        self.refresh(ctx)  # the App renders this event's (maybe older) state: every count is read again

    def on_change_extended_selection(self, ctx):
        self.refresh(ctx)

    def refresh(self, ctx, flagging=None, fresh: bool = False):
        """Show everything the panel shows as the dataset has it (``flagging``: a flagging's
        summary just computed, reused instead of counting again); returns the counts shown (None
        before there are predictions). Counts read since the dataset's last change are reused
        (``_MEMO``) unless ``fresh``."""
        # The App server keeps one Dataset object per process: fields another process (a job, a
        # notebook) added since are unknown to it until its document is reloaded.
        rv.reload_dataset(ctx.dataset)
        now = rv.data_version(ctx.dataset)
        version = None if fresh else now
        _show_selection(ctx)
        field = field_of(ctx)
        ctx.panel.set_state("classes_list", rv.class_list(ctx.dataset, field))
        if not _has_predictions(ctx):
            self._show_stages(ctx, version=version)
            ctx.panel.set_state("ready", False)
            return
        t = _threshold(ctx)
        known = ctx.panel.get_state("applied_threshold")  # what this panel last showed as applied
        present = [f for f in rs.STAGE_OUTPUT_FIELDS if ctx.dataset.has_sample_field(f)]
        key = (version, "summary", field, t, tuple(present))
        if flagging is not None and flagging.get("threshold") == t:
            _MEMO.put(key, flagging)  # counted just now: the App's events after a move reuse it
        # kept under the version too: the next threshold move counts only the samples it moves
        s = flagging or _MEMO.get(key, lambda: rv.summary(ctx.dataset, field, t, present=present, version=now))
        self._show_stages(ctx, s.get("present"), s["samples"], version)
        counts = {k: s[k] for k in ("samples", "flagged", "reviewed", "remaining", "queue", "would_flag")}
        counts["flagged_yet"] = bool(rv.settings(ctx.dataset))
        ctx.panel.set_state(
            {
                "ready": True,
                "applied_threshold": t,
                "counts": counts,
                "classes": s["classes"],
                "flag_count": _flag_count_text(counts, t),
            }
        )
        # The slider shows its state, the number its default. The slider is set only when the
        # applied value changed (or on first render): a slider differing from an unchanged applied
        # value is a move whose own event is still on its way (this event, e.g. the selection
        # change after the last flagging, left first), and setting it back would send the old value
        # as a new move: the two would then re-flag each other forever.
        slider = ctx.panel.get_state(SLIDER)
        if slider != t and (slider is None or known != t):
            self._set_control(ctx, SLIDER, t)
        ctx.panel.set_data("histogram", _histogram_traces(s["histogram"]))
        corrections, sugg = rv.suggestions(ctx.dataset, field, self._min_sim(ctx))
        prop = {"corrections": len(corrections), "suggested": len(sugg), "carried": s["suggested"]}
        ctx.panel.set_state({"propagation": prop, "propagation_text": _propagation_text(prop)})
        if ctx.panel.get_state("mode") == "audit":
            self._refresh_audit(ctx)
        return counts

    def _show_stages(self, ctx, labelled=None, n=None, version=None) -> list:
        """Stage rows, with the progress of the plugin's delegated runs on this dataset."""
        jobs = rs.active_jobs(ctx.dataset, PLUGIN)
        labelled = labelled if labelled else None
        key = (None if jobs else version, "stages", repr(labelled), n)  # a running job writes files too
        rows = _MEMO.get(key, lambda: rs.stage_status(ctx.dataset, labelled, n))
        ctx.panel.set_state({"jobs": jobs, "stages": rs.with_jobs(rows, jobs)})
        return jobs

    def on_poll(self, ctx):
        """Timer while a stage runs: progress per stage; everything refreshed once a run ends."""
        before = {j["id"] for j in ctx.panel.get_state("jobs") or []}
        now = {j["id"] for j in self._show_stages(ctx)}
        if before - now:
            self.refresh(ctx, fresh=True)  # a run ended: its labels, embeddings and files are there now

    def _min_sim(self, ctx) -> float:
        v = ctx.panel.get_state("min_similarity")
        return MIN_SIMILARITY if v is None else float(v)

    def _set_control(self, ctx, control: str, value: float) -> None:
        _ECHOES.push(ctx.panel_id, control, value)
        ctx.panel.set_state(control, value)

    def on_slider(self, ctx):
        self._move_threshold(ctx, SLIDER)

    def on_number(self, ctx):
        self._move_threshold(ctx, NUMBER)

    def _move_threshold(self, ctx, moved: str) -> None:
        """A threshold control was committed (the slider on release, the number on Enter / leaving
        it): flag below it, and the grid shows the flagged samples, least confident first. A value
        that is already applied (an echo, or the App sending a control's default) changes nothing."""
        v = ctx.params.get("value")
        if v is None or _ECHOES.is_echo(ctx.panel_id, moved, float(v)):
            return
        t = round(min(1.0, max(0.0, float(v))), 4)
        if rv.settings(ctx.dataset) and abs(_threshold(ctx) - t) < 1e-9:
            if t != float(v):
                self._set_control(ctx, moved, t)  # out of [0, 1]: show what is applied
            return
        self._flag(ctx, t)

    def _flag(self, ctx, t: float, show: bool = True) -> None:
        field = field_of(ctx)
        present = [f for f in rs.STAGE_OUTPUT_FIELDS if ctx.dataset.has_sample_field(f)]
        s = rv.flag_samples(ctx.dataset, field, threshold=t, present=present)
        self.refresh(ctx, flagging=s)
        if show:
            # tags changed, no field was added: the grid and its counts are re-read, not the schema
            _show(ctx, ctx.dataset.match_tags(rv.FLAGGED_TAG).sort_by(f"{field}.confidence"), reload="samples")

    def on_class_click(self, ctx):
        """A row of the class table: the grid shows that class's flagged samples (all if none)."""
        rows = ctx.panel.get_state("classes") or []
        row = ctx.params.get("row")
        if row is None or not (0 <= int(row) < len(rows)):
            return
        cls = rows[int(row)]["class"]
        field = field_of(ctx)
        view = ctx.dataset.match({f"{field}.label": cls})
        if rows[int(row)]["flagged"]:
            view = view.match_tags(rv.FLAGGED_TAG)
        ctx.panel.set_state("selected_class", cls)
        _show(ctx, view.sort_by(f"{field}.confidence"), reload=None)  # nothing written: the view is enough

    def on_show_all(self, ctx):
        ctx.panel.set_state("selected_class", None)
        ctx.ops.clear_view()
        _common.show_review_fields(ctx, reload=None)

    def _decide(self, ctx, action, label=None):
        ids = _targets(ctx)
        if not ids:
            ctx.ops.notify(
                "Select samples in the grid (or lasso points in the Embeddings map) first", variant="warning"
            )
            return
        try:
            r = rv.decide(ctx.dataset, ids, action, label, field_of(ctx))
        except NolaError as e:  # a message in the App, never a traceback
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.ops.clear_selected_samples()
        if ctx.extended_selection:
            ctx.ops.set_extended_selection(clear=True)
        what = f"corrected to '{label}'" if action == "correct" else f"{action}ed"
        _common.show_review_fields(ctx)
        counts = self.refresh(ctx) or {}
        left = f"; {counts['queue']} left in the review queue" if "queue" in counts else ""
        ctx.ops.notify(f"{_samples(r['samples'])} {what}{left}", variant="success")
        ctx.panel.set_state("selection", 0)  # cleared above; this event's context still holds it

    def on_accept(self, ctx):
        self._decide(ctx, "accept")

    def on_reject(self, ctx):
        self._decide(ctx, "reject")

    def on_correct(self, ctx):
        label = ctx.panel.get_state("correct_class")
        if not label:
            ctx.ops.notify("Choose the right class in the list first", variant="warning")
            return
        self._decide(ctx, "correct", label)

    def on_start_review(self, ctx):
        """Grid to the review queue and its first sample opened in the sample view (flagging at
        the shown threshold first if this dataset was never flagged)."""
        if not rv.settings(ctx.dataset):
            self._flag(ctx, _threshold(ctx), show=False)
        first = rv.next_in_queue(ctx.dataset)
        if first is None:
            ctx.ops.notify("The review queue is empty: move the threshold to flag samples", variant="info")
            return
        _open_in_sample_view(ctx, rv.queue_view(ctx.dataset), first)

    def on_min_similarity(self, ctx):
        v = ctx.params.get("value")
        if v is not None:
            ctx.panel.set_state("min_similarity", min(1.0, max(0.0, float(v))))
        self.refresh(ctx)

    def on_propagate(self, ctx):
        """Propagation runs as its operator (one click, no form), which reports its progress; the
        panel refreshes and the grid shows the suggestions when it is done."""
        ctx.prompt(
            f"{PLUGIN}/propagate_corrections",
            params={"field": field_of(ctx), "min_similarity": self._min_sim(ctx)},
            on_success=self.on_propagated,
            skip_prompt=True,
        )

    def on_propagated(self, ctx):
        self.refresh(ctx)
        _show(ctx, ctx.dataset.match_tags(rv.SUGGESTED_TAG))

    def on_run_stage(self, ctx):
        rows = ctx.panel.get_state("stages") or []
        row = ctx.params.get("row")
        if row is not None and 0 <= int(row) < len(rows):
            ctx.prompt(f"{PLUGIN}/{rows[int(row)]['operator']}", on_success=self.on_launched)

    def on_run_pipeline(self, ctx):
        ctx.prompt(f"{PLUGIN}/auto_label", on_success=self.on_launched)

    def on_launched(self, ctx):
        """A stage's form was executed: a delegated run is now listed (the timer polls its
        progress); an immediate one has finished."""
        self.refresh(ctx)

    def on_export(self, ctx):
        ctx.prompt(f"{PLUGIN}/export_accepted", on_success=self.on_launched)

    def on_evaluate(self, ctx):
        ctx.prompt(f"{PLUGIN}/evaluate_labels", params={"from_panel": True}, on_success=self.on_evaluated)

    def on_evaluated(self, ctx):
        """The evaluation ran: its per-class report and confusion matrix are one panel away, opened."""
        self.refresh(ctx)
        ctx.ops.open_panel(MODEL_EVALUATION_PANEL, layout="horizontal")

    def on_open_map(self, ctx):
        ctx.ops.open_panel("Embeddings", layout="horizontal")

    def on_open_evaluation(self, ctx):
        ctx.ops.open_panel(MODEL_EVALUATION_PANEL, layout="horizontal")

    def on_refresh(self, ctx):
        self.refresh(ctx, fresh=True)  # the person asked: everything is read again

    # ------------------------------------------------------------------ layout

    def render(self, ctx):
        panel = types.Object()
        st = ctx.panel.state
        self._render_stages(panel, st)
        if st.ready:
            modes = types.TabsView()
            modes.add_choice("review", label="Review")
            modes.add_choice("audit", label="Audit")
            panel.enum("mode", modes.values(), default=st.mode or "review", view=modes, on_change=self.on_mode)
            if st.mode == "audit":
                self._render_audit(ctx, panel, st)
            else:
                self._render_threshold(ctx, panel, st.counts or {})
                self._render_review(ctx, panel, st)
        else:
            panel.md("No predictions yet: run the pipeline (or its stages) first.", name="not_ready")
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))

    def _render_stages(self, panel, st) -> None:
        panel.md("**Stages**", name="stages_title")
        stages = types.TableView(on_click_row=None)
        for key, label in (
            ("stage", "Stage"),
            ("state", "State"),
            ("samples", "Samples"),
            ("model", "Model"),
            ("seconds", "Seconds"),
        ):
            stages.add_column(key, label=label)
        stages.add_row_action(
            "run", self.on_run_stage, label="Run", icon="play_arrow", tooltip="Open this stage's form"
        )
        panel.list("stages", types.Object(), view=stages)
        jobs = st.jobs or []
        if jobs:  # poll while something runs; no timer otherwise
            panel.view("poll", types.TimerView(interval=POLL_MS, on_interval=self.on_poll))
            panel.md(
                "  \n".join(
                    f"**{j['operator']}** {j['state']}: {j['label'] or 'waiting for an executor'}"
                    + (f" ({j['percent']}%)" if j["percent"] is not None else "")
                    for j in jobs
                ),
                name="jobs_text",
            )
        bar = panel.h_stack("stage_buttons", gap=1)
        bar.btn("run_pipeline", label="Run the whole pipeline", icon="play_circle", on_click=self.on_run_pipeline)
        bar.btn("open_map", label="Embeddings map", icon="scatter_plot", on_click=self.on_open_map)
        bar.btn("open_evaluation", label="Model Evaluation", icon="ssid_chart", on_click=self.on_open_evaluation)
        bar.btn("refresh", label="Refresh", icon="refresh", on_click=self.on_refresh)

    def _render_threshold(self, ctx, panel, counts) -> None:
        panel.md("**Confidence threshold**", name="threshold_title")
        t = _threshold(ctx)
        # Defaults are the applied threshold: the App sends a control's default back as a change,
        # which then equals what is applied and changes nothing (a page reload keeps the stored one).
        panel.float(
            SLIDER,
            default=t,
            min=0.0,
            max=1.0,
            on_change=self.on_slider,
            view=types.SliderView(
                label="Flag samples below this confidence",
                label_position="top",
                value_precision=2,
                componentsProps={"slider": {"min": 0, "max": 1, "step": 0.01}},
            ),
        )
        # Applied once, when the field is left or its check mark clicked, never per keystroke; its
        # name follows the applied value, so it shows the slider's value after a drag.
        panel.float(
            f"{NUMBER}_{round(t * 10000)}",
            default=t,
            min=0.0,
            max=1.0,
            on_change=self.on_number,
            label="Threshold (type a number, then Tab or the check mark)",
            view=types.LazyFieldView(save_on_blur=True),
        )
        panel.md(ctx.panel.state.flag_count or _flag_count_text(counts, t), name="flag_count")
        panel.plot(
            "histogram",
            layout={
                "title": "Confidence (red: flagged)",
                "barmode": "stack",
                "height": 220,
                "margin": {"t": 30, "b": 30, "l": 40, "r": 10},
                "xaxis": {"range": [0, 1]},
                "showlegend": False,
                "shapes": [
                    {"type": "line", "x0": t, "x1": t, "y0": 0, "y1": 1, "yref": "paper", "line": {"dash": "dash"}}
                ],
            },
            config={"displayModeBar": False},
        )
        self._render_classes(panel)

    def _render_classes(self, panel) -> None:
        panel.md("**Classes (click one to filter the grid)**", name="classes_title")
        table = types.TableView(on_click_row=self.on_class_click)
        for key, label in (
            ("class", "Class"),
            ("count", "Count"),
            ("mean_confidence", "Mean conf."),
            ("flagged", "Flagged"),
            ("reviewed", "Reviewed"),
            ("remaining", "Remaining"),
        ):
            table.add_column(key, label=label)
        panel.list("classes", types.Object(), view=table)

    def _render_review(self, ctx, panel, st) -> None:
        panel.md("**Review**", name="review_title")
        go = panel.h_stack("review_buttons", gap=1)
        go.btn(
            "start_review",
            label="Review the queue",
            icon="rate_review",
            variant="contained",
            on_click=self.on_start_review,
        )
        go.btn("show_all", label="Show all samples", icon="filter_alt_off", on_click=self.on_show_all)
        go.btn("export", label="Export…", icon="download", on_click=self.on_export)
        go.btn("evaluate", label="Evaluate…", icon="assessment", on_click=self.on_evaluate)
        panel.md(st.selection_text or _selection_text(st.selection or 0), name="selection_text")
        act = panel.h_stack("actions", gap=1, align_y="center")
        act.btn("accept", label="Accept selected", icon="check", on_click=self.on_accept, variant="contained")
        act.btn("reject", label="Reject selected", icon="close", on_click=self.on_reject)
        if st.classes_list:
            act.enum("correct_class", st.classes_list, label="Right class", view=types.DropdownView(space=3))
        act.btn("correct", label="Correct selected", icon="edit", on_click=self.on_correct)

        prop = st.propagation or {}
        panel.md("**Propagate corrections**", name="propagation_title")
        prow = panel.h_stack("propagation_row", gap=2, align_y="center")
        prow.float(
            "min_similarity",
            default=self._min_sim(ctx),
            min=0.0,
            max=1.0,
            label="Similarity ≥",
            on_change=self.on_min_similarity,
            view=types.LazyFieldView(space=3, save_on_blur=True),
        )
        prow.btn(
            "propagate",
            label="Suggest to neighbours",
            icon="hub",
            on_click=self.on_propagate,
            disabled=not prop.get("suggested"),
        )
        panel.md(st.propagation_text or _propagation_text(prop), name="propagation_text")


# Texts that carry counts live in the panel's state, set where the counts are read: the App
# renders the panel again after every event with the state that event was sent with, so a
# text computed in render() from an event sent before a refresh (closing the sample view also
# sends a selection change) would put the old counts back; a state value is never rolled back.


def _show_selection(ctx) -> None:
    n = len(_targets(ctx))
    ctx.panel.set_state({"selection": n, "selection_text": _selection_text(n)})


def _selection_text(n: int) -> str:
    return f"Selected: {_samples(n, '**')} (grid selection, or a lasso in the Embeddings map)"


def _samples(n: int, bold: str = "") -> str:
    return f"{bold}{n}{bold} sample{'' if n == 1 else 's'}"


def _propagation_text(prop: dict) -> str:
    text = (
        f"**{prop.get('suggested', 0)}** undecided neighbours would get a suggestion from "
        f"{prop.get('corrections', 0)} corrections (nearest, same wrong label; tag `{rv.SUGGESTED_TAG}`, back "
        "in the queue), never a reviewed label."
    )
    if prop.get("carried"):
        text += f"  \n**{prop['carried']}** samples carry a suggestion now"
    return text


def _flag_count_text(counts: dict, t: float) -> str:
    if counts.get("flagged_yet", True):
        return (
            f"**{counts.get('flagged', 0)}** of {counts.get('samples', 0)} samples flagged below **{t:.2f}** · "
            f"review progress **{counts.get('reviewed', 0)} / {counts.get('flagged', 0)}** · queue "
            f"**{counts.get('queue', 0)}**"
        )
    return (
        f"Not flagged yet: **{counts.get('would_flag', 0)}** of {counts.get('samples', 0)} samples are below "
        f"**{t:.2f}**; move the threshold or start the review to flag them"
    )
