"""The NoLA panels: a review workspace docked beside the grid, and one-click review in the
sample view. Thin: each callback reads the panel state / App context, calls one function of
:mod:`fiftyone_nola.stages.review_workspace`, and writes what it returns back to the panel.
"""

from __future__ import annotations

import threading

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_nola.stages import review_workspace as rw

PLUGIN = "@fiftyone-nola/nola"
DEFAULT_FIELD = "nola"
REVIEW_PANEL = "nola_sample_review"
NB_SHOWN = 6


def _media_url(filepath) -> str | None:
    """The App server's URL of a local media file."""
    from urllib.parse import quote

    return f"/media?filepath={quote(str(filepath), safe='')}" if filepath else None


def _field(ctx) -> str:
    return rw.settings(ctx.dataset).get("field") or DEFAULT_FIELD


def _has_predictions(ctx) -> bool:
    return ctx.dataset is not None and ctx.dataset.has_sample_field(_field(ctx))


def _threshold(ctx) -> float:
    """The applied threshold: the last flagging's, stored on the dataset (default 0.5)."""
    t = ctx.panel.get_state("applied_threshold")
    if t is None:
        t = rw.settings(ctx.dataset).get("threshold")
    return 0.5 if t is None else float(t)


def _targets(ctx) -> list:
    """The samples the review buttons act on: the grid selection, else a lasso in the map."""
    if ctx.selected:
        return list(ctx.selected)
    ext = ctx.extended_selection
    if isinstance(ext, dict):
        ext = ext.get("selection")
    return list(ext or [])


def _histogram_traces(h: dict) -> list:
    return [
        {"type": "bar", "name": "flagged (below threshold)", "x": h["centers"], "y": h["below"],
         "marker": {"color": "#e0562f"}, "width": 0.045},
        {"type": "bar", "name": "kept", "x": h["centers"], "y": h["above"], "marker": {"color": "#6c8ebf"},
         "width": 0.045},
    ]


def _show(ctx, view) -> None:
    """Point the grid at ``view`` and make the review fields visible there."""
    ctx.ops.set_view(view)
    _common().show_review_fields(ctx)


# App events run in server threads, and loading the dataset in one event reloads the shared
# Dataset object under another's feet (a field just added vanishes from its schema): the
# panels' events run one at a time.
_PANEL_LOCK = threading.RLock()


class _Serialized:
    def execute(self, ctx):
        with _PANEL_LOCK:
            return super().execute(ctx)


def _common():
    from . import _common

    return _common


class NolaPanel(_Serialized, foo.Panel):
    """Stages, per-class table, confidence histogram with a live threshold, review buttons."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="nola_panel", label="NoLA review", icon="fact_check", surfaces="grid",
            help_markdown="Auto-labels with NoLA and reviews the doubtful ones: move the threshold, click a "
                          "class to filter the grid, act on the selection, review the queue in the sample view.",
        )

    # ------------------------------------------------------------------ events

    def on_load(self, ctx):
        self.refresh(ctx)
        ctx.panel.set_state("initial_threshold", _threshold(ctx))

    def on_change_dataset(self, ctx):
        self.refresh(ctx)

    def on_change_selected(self, ctx):
        ctx.panel.set_state("selection", len(_targets(ctx)))

    def on_change_extended_selection(self, ctx):
        ctx.panel.set_state("selection", len(_targets(ctx)))

    def refresh(self, ctx, flag: bool = False):
        """Recompute everything the panel shows (optionally re-flagging at the threshold)."""
        # The App server keeps one Dataset object per process: fields another process (a job, a
        # notebook) added since are unknown to it until reloaded, and writing them then fails.
        ctx.dataset.reload()
        ctx.panel.set_state("stages", rw.stage_status(ctx.dataset))
        ctx.panel.set_state("selection", len(_targets(ctx)))
        ctx.panel.set_state("classes_list", rw.class_list(ctx.dataset, _field(ctx)))
        if not _has_predictions(ctx):
            ctx.panel.set_state("ready", False)
            return
        t = _threshold(ctx)
        field = _field(ctx)
        if not rw.settings(ctx.dataset):
            flag = True  # first look at this dataset: flag at the default threshold, so the queue exists
        if flag:
            rw.flag_samples(ctx.dataset, field, threshold=t)
        pv = rw.preview(ctx.dataset, field, t)
        queue = len(rw.queue_ids(ctx.dataset))
        ctx.panel.set_state({"ready": True, "applied_threshold": t, "counts": {
            "samples": pv["samples"], "flagged": pv["flagged"], "reviewed": pv["reviewed"],
            "remaining": pv["remaining"], "queue": queue}, "classes": pv["classes"]})
        ctx.panel.set_data("histogram", _histogram_traces(pv["histogram"]))
        prop = rw.propagate_corrections(ctx.dataset, field, self._min_sim(ctx), apply=False)
        ctx.panel.set_state("propagation", {k: prop[k] for k in ("corrections", "suggested")})

    def _min_sim(self, ctx) -> float:
        v = ctx.panel.get_state("min_similarity")
        return 0.9 if v is None else float(v)

    def on_threshold(self, ctx):
        """Slider or number moved: flag at the new threshold, count, and filter the grid to it."""
        from fiftyone import ViewField as F

        v = ctx.params.get("value")
        if v is None:
            return
        t = round(min(1.0, max(0.0, float(v))), 4)
        applied = rw.settings(ctx.dataset).get("threshold")
        if applied is not None and abs(float(applied) - t) < 1e-9:
            return  # already applied
        # The slider and the number keep their own values in the App (setting one from here
        # makes the App send it back as a change, and two controls then ping-pong): the
        # applied threshold is shown in the count line and on the histogram.
        ctx.panel.state._data["applied_threshold"] = t
        self.refresh(ctx, flag=True)
        field = _field(ctx)
        _show(ctx, ctx.dataset.match_tags(rw.FLAGGED_TAG).sort_by(F(f"{field}.confidence")))

    def on_class_click(self, ctx):
        """A row of the class table: the grid shows that class's flagged samples (all if none)."""
        from fiftyone import ViewField as F

        rows = ctx.panel.get_state("classes") or []
        row = ctx.params.get("row")
        if row is None or not (0 <= int(row) < len(rows)):
            return
        cls = rows[int(row)]["class"]
        field = _field(ctx)
        view = ctx.dataset.match(F(f"{field}.label") == cls)
        if rows[int(row)]["flagged"]:
            view = view.match_tags(rw.FLAGGED_TAG)
        ctx.panel.set_state("selected_class", cls)
        _show(ctx, view.sort_by(F(f"{field}.confidence")))

    def on_show_all(self, ctx):
        ctx.panel.set_state("selected_class", None)
        ctx.ops.clear_view()
        _common().show_review_fields(ctx)

    def _decide(self, ctx, action, label=None):
        ids = _targets(ctx)
        if not ids:
            ctx.ops.notify("Select samples in the grid (or lasso points in the Embeddings map) first",
                           variant="warning")
            return
        try:
            r = rw.decide(ctx.dataset, ids, action, label, _field(ctx))
        except Exception as e:  # a message in the App, never a traceback
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.ops.clear_selected_samples()
        if ctx.extended_selection:
            ctx.ops.set_extended_selection(clear=True)
        what = f"corrected to '{label}'" if action == "correct" else f"{action}ed"
        ctx.ops.notify(f"{r['samples']} samples {what}; {r['queue']} left in the review queue", variant="success")
        _common().show_review_fields(ctx)
        self.refresh(ctx)

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
        """Grid to the review queue and its first sample opened in the sample view."""
        ids = rw.queue_ids(ctx.dataset)
        if not ids:
            ctx.ops.notify("The review queue is empty: move the threshold to flag samples", variant="info")
            return
        _show(ctx, rw.queue_view(ctx.dataset))
        ctx.ops.open_sample(id=ids[0])

    def on_min_similarity(self, ctx):
        v = ctx.params.get("value")
        if v is not None:
            ctx.panel.set_state("min_similarity", min(1.0, max(0.0, float(v))))
        self.refresh(ctx)

    def on_propagate(self, ctx):
        r = rw.propagate_corrections(ctx.dataset, _field(ctx), self._min_sim(ctx))
        if not r["suggested"]:
            ctx.ops.notify(f"No undecided neighbour with the same wrong label at similarity >= "
                           f"{self._min_sim(ctx):.2f} ({r['corrections']} corrections)", variant="info")
        else:
            ctx.ops.notify(f"{r['suggested']} neighbours got a suggestion (tagged {rw.SUGGESTED_TAG}, in the queue): "
                           + ", ".join(f"{k}: {v}" for k, v in r["by_label"].items()), variant="success")
            _show(ctx, ctx.dataset.match_tags(rw.SUGGESTED_TAG))
        ctx.panel.set_state("last_propagation", {k: r[k] for k in ("corrections", "suggested", "by_label")})
        self.refresh(ctx)

    def on_run_stage(self, ctx):
        rows = ctx.panel.get_state("stages") or []
        row = ctx.params.get("row")
        if row is not None and 0 <= int(row) < len(rows):
            ctx.prompt(f"{PLUGIN}/{rows[int(row)]['operator']}")

    def on_run_pipeline(self, ctx):
        ctx.prompt(f"{PLUGIN}/auto_label")

    def on_export(self, ctx):
        ctx.prompt(f"{PLUGIN}/export_accepted")

    def on_open_map(self, ctx):
        ctx.ops.open_panel("Embeddings", layout="horizontal")

    def on_refresh(self, ctx):
        self.refresh(ctx)

    # ------------------------------------------------------------------ layout

    def render(self, ctx):
        panel = types.Object()
        st = ctx.panel.state
        counts = st.counts or {}
        panel.md("**Stages**", name="stages_title")
        stages = types.TableView(on_click_row=None)
        for key, label in (("stage", "Stage"), ("state", "State"), ("samples", "Samples"), ("model", "Model"),
                           ("seconds", "Seconds")):
            stages.add_column(key, label=label)
        stages.add_row_action("run", self.on_run_stage, label="Run", icon="play_arrow", tooltip="Open this stage's form")
        panel.list("stages", types.Object(), view=stages)
        bar = panel.h_stack("stage_buttons", gap=1)
        bar.btn("run_pipeline", label="Run the whole pipeline", icon="play_circle", on_click=self.on_run_pipeline)
        bar.btn("open_map", label="Embeddings map", icon="scatter_plot", on_click=self.on_open_map)
        bar.btn("refresh", label="Refresh", icon="refresh", on_click=self.on_refresh)
        if not st.ready:
            panel.md("No predictions yet: run the pipeline (or its stages) first.", name="not_ready")
            return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))

        panel.md("**Confidence threshold**", name="threshold_title")
        start = ctx.panel.get_state("initial_threshold") or 0.5  # constant: a changing default is sent back
        panel.float("threshold", default=start, min=0.0, max=1.0, on_change=self.on_threshold,
                    view=types.SliderView(label="Flag samples below this confidence", label_position="top",
                                          value_precision=2,
                                          componentsProps={"slider": {"min": 0, "max": 1, "step": 0.01}}))
        panel.float("threshold_value", default=start, min=0.0, max=1.0, on_change=self.on_threshold,
                    label="Threshold (type a number, Enter)", view=types.FieldView())
        panel.md(f"**{counts.get('flagged', 0)}** of {counts.get('samples', 0)} samples flagged below "
                 f"**{_threshold(ctx):.2f}** · review progress **{counts.get('reviewed', 0)} / "
                 f"{counts.get('flagged', 0)}** · queue **{counts.get('queue', 0)}**", name="flag_count")
        panel.plot("histogram", layout={
            "title": "Confidence (red: flagged)", "barmode": "stack", "height": 220,
            "margin": {"t": 30, "b": 30, "l": 40, "r": 10}, "xaxis": {"range": [0, 1]},
            "showlegend": False, "shapes": [{"type": "line", "x0": _threshold(ctx), "x1": _threshold(ctx),
                                             "y0": 0, "y1": 1, "yref": "paper", "line": {"dash": "dash"}}]},
            config={"displayModeBar": False})

        panel.md("**Classes (click one to filter the grid)**", name="classes_title")
        table = types.TableView(on_click_row=self.on_class_click)
        for key, label in (("class", "Class"), ("count", "Count"), ("mean_confidence", "Mean conf."),
                           ("flagged", "Flagged"), ("reviewed", "Reviewed"), ("remaining", "Remaining")):
            table.add_column(key, label=label)
        panel.list("classes", types.Object(), view=table)

        panel.md("**Review**", name="review_title")
        go = panel.h_stack("review_buttons", gap=1)
        go.btn("start_review", label=f"Review the queue ({counts.get('queue', 0)})", icon="rate_review",
               variant="contained", on_click=self.on_start_review)
        go.btn("show_all", label="Show all samples", icon="filter_alt_off", on_click=self.on_show_all)
        go.btn("export", label="Export…", icon="download", on_click=self.on_export)
        n_sel = st.selection or 0
        panel.md(f"Selected: **{n_sel}** samples (grid selection, or a lasso in the Embeddings map)",
                 name="selection_text")
        act = panel.h_stack("actions", gap=1, align_y="center")
        act.btn("accept", label="Accept selected", icon="check", on_click=self.on_accept, variant="contained")
        act.btn("reject", label="Reject selected", icon="close", on_click=self.on_reject)
        classes = st.classes_list or []
        if classes:
            act.enum("correct_class", classes, label="Right class", view=types.DropdownView(space=3))
        act.btn("correct", label="Correct selected", icon="edit", on_click=self.on_correct)

        prop = st.propagation or {}
        panel.md("**Propagate corrections**", name="propagation_title")
        prow = panel.h_stack("propagation_row", gap=2, align_y="center")
        prow.float("min_similarity", default=self._min_sim(ctx), min=0.0, max=1.0, label="Similarity ≥",
                   on_change=self.on_min_similarity, view=types.FieldView(space=3))
        prow.btn("propagate", label=f"Suggest to {prop.get('suggested', 0)} neighbours", icon="hub",
                 on_click=self.on_propagate, disabled=not prop.get("suggested"))
        panel.md(f"{prop.get('corrections', 0)} corrections; their undecided nearest neighbours with the same "
                 f"wrong label get the correction as a suggestion (tag `{rw.SUGGESTED_TAG}`, back in the queue), "
                 "never as a reviewed label.", name="propagation_text")
        last = st.last_propagation
        if last:
            panel.md(f"Last run: **{last['suggested']}** neighbours touched from {last['corrections']} corrections",
                     name="propagation_last")
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))


class NolaSampleReview(_Serialized, foo.Panel):
    """In the sample view: the sample's labels per stage, its neighbours' labels, and one click
    to accept or pick a class, which moves on to the next sample of the review queue."""

    @property
    def config(self):
        return foo.PanelConfig(
            name=REVIEW_PANEL, label="NoLA sample review", icon="rate_review", surfaces="modal",
            help_markdown="One click per sample: accept the label or pick the right class; "
                          "the next sample of the review queue opens.",
        )

    def on_load(self, ctx):
        self.show(ctx)

    def on_change_current_sample(self, ctx):
        self.show(ctx)

    def show(self, ctx, sample_id=None):
        sid = sample_id or ctx.current_sample
        if not sid or ctx.dataset is None:
            ctx.panel.set_state("card", None)
            return
        card = rw.sample_card(ctx.dataset, sid, _field(ctx))
        nbs = {f"nb_col_{j}": {f"nb_img_{j}": _media_url(n["filepath"])}
               for j, n in enumerate(card["neighbours"][:NB_SHOWN])}
        ctx.panel.set_state({"card": card, "queue": len(rw.queue_ids(ctx.dataset)), "progress": rw.progress(ctx.dataset),
                             "classes_list": rw.class_list(ctx.dataset, _field(ctx)),
                             "images": {"image": _media_url(card["filepath"])}, "neighbour_images": nbs})

    def _record(self, ctx, action, label=None):
        card = ctx.panel.get_state("card") or {}
        sid = card.get("id") or ctx.current_sample
        if not sid:
            return
        try:
            rw.decide(ctx.dataset, [sid], action, label, _field(ctx))
        except Exception as e:
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.panel.set_state("last", {"id": sid, "action": action, "label": label})
        nxt = rw.next_in_queue(ctx.dataset, after=sid)
        if nxt is None:
            ctx.ops.notify("Review queue done", variant="success")
            self.show(ctx, sid)
            ctx.ops.reload_samples()
            return
        ctx.ops.open_sample(id=nxt)
        self.show(ctx, nxt)

    def on_accept(self, ctx):
        self._record(ctx, "accept")

    def on_accept_suggestion(self, ctx):
        card = ctx.panel.get_state("card") or {}
        self._record(ctx, "correct", card.get("suggestion"))

    def on_reject(self, ctx):
        self._record(ctx, "reject")

    def on_pick(self, ctx):
        self._record(ctx, "correct", ctx.params.get("label"))

    def on_close(self, ctx):
        ctx.ops.close_sample()
        _common().show_review_fields(ctx)

    def on_skip(self, ctx):
        card = ctx.panel.get_state("card") or {}
        nxt = rw.next_in_queue(ctx.dataset, after=card.get("id"))
        if nxt:
            ctx.ops.open_sample(id=nxt)
            self.show(ctx, nxt)

    def render(self, ctx):
        panel = types.Object()
        card = ctx.panel.get_state("card")
        if not card:
            panel.md("Open a sample to review it.", name="empty")
            return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))
        pred = card.get("prediction")
        sugg = card.get("suggestion")
        prog = ctx.panel.get_state("progress") or {}
        lines = [f"**Status**: {card['status']} · **queue**: {ctx.panel.get_state('queue') or 0} left"
                 f" · reviewed {prog.get('reviewed', 0)} of {prog.get('flagged', 0)} flagged", "",
                 "| stage | label | confidence |", "|---|---|---|"]
        lines += [f"| {s['field']} | {s['label']} | {'-' if s['confidence'] is None else s['confidence']} |"
                  for s in card["stages"]]
        if card["neighbours"]:
            lines += ["", "**Nearest neighbours** (stored index) below: their labels · similarity"]
        imgs = panel.h_stack("images", gap=2, align_y="top")
        imgs.view("image", types.ImageView(height="224px", alt="sample"))
        imgs.md("\n".join(lines), name="card_md")
        if card["neighbours"]:
            nbs = panel.h_stack("neighbour_images", gap=1)
            for j, n in enumerate(card["neighbours"][:NB_SHOWN]):
                col = nbs.v_stack(f"nb_col_{j}", gap=0)
                col.view(f"nb_img_{j}", types.ImageView(height="72px", alt=n["label"] or ""))
                col.md(f"{n['label']} · {n['similarity']:.2f}", name=f"nb_txt_{j}")
        top = panel.h_stack("main_actions", gap=1)
        if sugg:
            top.btn("accept_suggestion", label=f"Accept suggestion: {sugg}", icon="done_all", variant="contained",
                    on_click=self.on_accept_suggestion)
        top.btn("accept", label=f"Accept: {pred}" if pred else "Accept", icon="check",
                variant="outlined" if sugg else "contained", on_click=self.on_accept)
        top.btn("reject", label="Reject", icon="close", on_click=self.on_reject)
        top.btn("skip", label="Skip", icon="skip_next", on_click=self.on_skip)
        top.btn("close", label="Back to the grid", icon="grid_view", on_click=self.on_close)
        panel.md("Or pick the right class (one click, then the next sample opens):", name="pick_text")
        classes = ctx.panel.get_state("classes_list") or []
        for r in range(0, len(classes), 4):
            row = panel.h_stack(f"pick_row_{r // 4}", gap=1)
            for cls in classes[r:r + 4]:
                row.btn(f"pick_{r}_{classes.index(cls)}", label=cls, on_click=self.on_pick, params={"label": cls},
                        variant="outlined")
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, padding=1))
