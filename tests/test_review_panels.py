"""The two review panels' callbacks driven through a real ExecutionContext, as the App sends them:
the grid panel (counts, threshold, class table, buttons, stage progress) and the sample view's
one-click card. No browser (tests/test_browser_review.py drives the same panels in Chromium)."""

import yaml

from conftest import REPO, REVIEW_CLASSES
from panel_ctx import PanelCtx

PLUGIN = yaml.safe_load((REPO / "fiftyone.yml").read_text())["name"]
CLASSES = REVIEW_CLASSES


def names(prop) -> set:
    """Every property name a panel renders, nested stacks included."""
    out = set()
    for name, p in (getattr(prop.type, "properties", None) or {}).items():
        out |= {name} | names(p)
    return out


def modified(ds) -> tuple:
    """Everything a write would change: every sample's and the dataset's last modification."""
    ds.reload()
    return tuple(ds.values("last_modified_at")), ds._doc.last_modified_at, len(ds.list_saved_views())


def test_grid_panel_callbacks(review_ds):
    from fiftyone_nola.stages import review as rv
    from operators.panels import NolaPanel

    ds, panel = review_ds, NolaPanel()
    pc = PanelCtx(ds)
    panel.on_load(pc.ctx)
    st = pc.state
    assert st["ready"] and st["applied_threshold"] == 0.5 and st["counts"]["would_flag"] == 8
    assert [r["class"] for r in st["classes"]] == CLASSES
    assert any(r["stage"] == "CLIP embeddings" and r["state"] == "fresh" for r in st["stages"])
    panel.render(pc.ctx)  # renders without error

    # moving the threshold flags live, and the grid follows
    pc = PanelCtx(ds, state=st, value=0.3)
    panel.on_slider(pc.ctx)
    assert pc.state["counts"]["flagged"] == 5 and pc.state["applied_threshold"] == 0.3
    assert len(ds.match_tags(rv.FLAGGED_TAG)) == 5
    assert "set_view" in " ".join(pc.op_names())

    # a class row filters the grid to that class's flagged samples
    pc = PanelCtx(ds, state=pc.state, row=1)
    panel.on_class_click(pc.ctx)
    view_ops = [p for n, p in pc.ops() if n.endswith("set_view")]
    assert view_ops and pc.state["selected_class"] == "dog"

    # buttons act on the selection, then clear it
    ids = rv.queue_ids(ds)
    pc = PanelCtx(ds, state=pc.state, selected=ids[:2])
    panel.on_accept(pc.ctx)
    assert "clear_selected_samples" in " ".join(pc.op_names()) and pc.state["selection"] == 0
    assert pc.state["counts"]["reviewed"] == 2 and pc.state["counts"]["queue"] == 3
    other = next(c for c in CLASSES if c != ds[ids[2]].nola.label)
    pc = PanelCtx(ds, state={**pc.state, "correct_class": other}, selected=ids[2:3])
    panel.on_correct(pc.ctx)
    assert ds[ids[2]].nola_reviewed.label == other
    pc = PanelCtx(ds, state=pc.state)  # nothing selected: a warning, nothing written
    panel.on_reject(pc.ctx)
    assert "notify" in " ".join(pc.op_names()) and "nola:rejected" not in ds.count_sample_tags()


def test_grid_actions_ask_the_app_for_no_more_round_trips_than_they_need(review_ds):
    """Every grid action reloaded the App's dataset and set the active fields again after setting
    the view: up to three grid reloads for one click (1.4 s for a class row at 100,000 samples in
    Chromium, of which the callback took 0.006 s). A class row wrote nothing: the view alone; a
    threshold move wrote tags: the grid is re-read, not the schema; active fields stay as they are."""
    from operators.panels import NolaPanel

    ds, panel = review_ds, NolaPanel()
    active = ["tags", "nola", "nola_reviewed", "nola_suggested", "ground_truth"]
    pc = PanelCtx(ds, active_fields=active)
    panel.on_load(pc.ctx)

    def names(pc):  # what reaches the grid (panel state updates aside)
        return [n.split("/")[-1] for n in pc.op_names() if not n.endswith("panel_state")]

    pc = PanelCtx(ds, state=pc.state, row=1, active_fields=active)
    panel.on_class_click(pc.ctx)
    assert names(pc) == ["set_view"]
    from fiftyone_nola.stages import review as rv

    t = 0.35 if rv.applied_threshold(ds) != 0.35 else 0.4  # a move (the fixture is shared)
    pc = PanelCtx(ds, state=pc.state, value=t, active_fields=active)
    panel.on_slider(pc.ctx)
    # from another view: the new view re-reads the grid and its counts, one round of the App's
    # queries (a reload as well was a second round, most of a move's wait at 100,000 samples)
    assert [n for n in names(pc) if n != "patch_panel_data"] == ["set_view"]
    flagged = ds.match_tags(rv.FLAGGED_TAG).sort_by("nola.confidence")  # now shown: the same view again
    pc = PanelCtx(ds, state=pc.state, value=t + 0.05, active_fields=active, view=flagged)
    panel.on_slider(pc.ctx)
    assert [n for n in names(pc) if n != "patch_panel_data"] == ["reload_samples"]
    pc = PanelCtx(ds, state=pc.state, row=2, active_fields=["tags"])  # the predictions hidden meanwhile
    panel.on_class_click(pc.ctx)
    assert names(pc) == ["set_view", "set_active_fields"]


def test_sample_panel_one_click_moves_through_the_queue(review_ds):
    from fiftyone_nola.stages import review as rv
    from operators.sample_panel import NolaSampleReview

    ds, panel = review_ds, NolaSampleReview()
    rv.flag_samples(ds, "nola", threshold=0.5)
    queue = rv.queue_ids(ds)
    state, current = {}, queue[0]
    opened, buttons = [], []
    for i in range(5):  # each sample: exactly one click, alternating accept / pick a class
        pc = PanelCtx(ds, state=state, current_sample=current)
        panel.on_change_current_sample(pc.ctx)
        assert pc.state["card"]["id"] == current and pc.state["card"]["neighbours"]
        buttons.append(set(panel.render(pc.ctx).type.properties))
        pc = PanelCtx(ds, state=pc.state, current_sample=current, **({"label": "truck"} if i % 2 else {}))
        (panel.on_pick if i % 2 else panel.on_accept)(pc.ctx)
        nxt = [p["id"] for n, p in pc.ops() if n.endswith("open_sample")]
        assert len(nxt) == 1 and nxt[0] != current and pc.state["card"]["id"] == nxt[0]
        echo = PanelCtx(ds, state=pc.state, current_sample=nxt[0])  # the App's event for that opening
        panel.on_change_current_sample(echo.ctx)
        assert echo.op_names() == []  # its card is shown already: nothing computed or sent again
        opened.append(current)
        state, current = pc.state, nxt[0]
    assert len(rv.queue_ids(ds)) == len(queue) - 5 and state["progress"]["reviewed"] == 5
    assert ds.match_tags(list(rv.DECIDED_TAGS)).count() == 5
    assert set(opened) == set(queue[:5])
    # every sample gets its own buttons: the one clicked on a sample never keeps its focus outline
    # on the next (they looked pre-selected)
    actions = [{b for b in names if b.startswith("main_actions")} for names in buttons]
    assert all(len(a) == 1 for a in actions) and len(set.union(*actions)) == 5


def test_counts_follow_decisions_made_in_the_sample_view(review_ds):
    """Back to the grid after reviewing: the grid panel shows the new counts without Refresh
    (it hears the sample view close)."""
    from fiftyone_nola.stages import review as rv
    from operators.panels import NolaPanel
    from operators.sample_panel import NolaSampleReview

    ds, grid, card = review_ds, NolaPanel(), NolaSampleReview()
    pc = PanelCtx(ds, value=0.5)
    grid.on_load(pc.ctx)
    pc = PanelCtx(ds, state=pc.state, value=0.45)
    grid.on_slider(pc.ctx)
    st = pc.state
    assert st["counts"]["reviewed"] == 0 and st["counts"]["queue"] == 7
    sid = rv.next_in_queue(ds)
    for _ in range(3):
        cpc = PanelCtx(ds, current_sample=sid)
        card.on_accept(cpc.ctx)
        sid = [p["id"] for n, p in cpc.ops() if n.endswith("open_sample")][0]
    cpc = PanelCtx(ds, state=cpc.state, current_sample=sid)
    card.on_close(cpc.ctx)
    # no card of the closed sample is left to show when the sample view opens on another one
    assert cpc.state["card"] is None and "empty" in names(card.render(cpc.ctx))
    pc = PanelCtx(ds, state=st)  # the App closes the sample view: no current sample
    grid.on_change_current_sample(pc.ctx)
    assert pc.state["counts"]["reviewed"] == 3 and pc.state["counts"]["queue"] == 4
    assert sum(r["reviewed"] for r in pc.state["classes"]) == 3


def test_events_that_change_nothing_reuse_the_counts_and_any_write_reads_them_again(review_ds, monkeypatch):
    """The App sends the grid panel an event per selection change and view change; each read every
    count again (0.2 s at 100,000 samples, holding the panel and the App server while the App's
    own queries for the new view waited). Counts are now read again only when the dataset changed:
    a decision, a deletion, a settings change, or the Refresh button."""
    from fiftyone_nola.stages import review as rv
    from operators.panels import NolaPanel

    counted = []
    summary = rv.summary
    monkeypatch.setattr(rv, "summary", lambda *a, **k: counted.append(1) or summary(*a, **k))
    ds, panel = review_ds, NolaPanel()
    rv.flag_samples(ds, "nola", threshold=0.5)
    pc = PanelCtx(ds)
    panel.on_load(pc.ctx)
    assert len(counted) == 1 and pc.state["counts"]["reviewed"] == 0
    ids = rv.queue_ids(ds)
    pc = PanelCtx(ds, state=pc.state, selected=ids[:2])
    panel.on_change_selected(pc.ctx)
    pc = PanelCtx(ds, state=pc.state)
    panel.on_change_extended_selection(pc.ctx)
    assert len(counted) == 1 and pc.state["counts"]["reviewed"] == 0  # nothing changed: nothing read
    assert pc.state["selection"] == 0  # the selection itself is always the event's

    rv.decide(ds, ids[:1], "accept", field="nola")  # another process, e.g. the sample view
    pc = PanelCtx(ds, state=pc.state)
    panel.on_change_extended_selection(pc.ctx)
    assert len(counted) == 2 and pc.state["counts"]["reviewed"] == 1
    ds.delete_samples(ids[1])
    panel.on_change_selected(PanelCtx(ds, state=pc.state).ctx)
    assert len(counted) == 3
    rv.flag_samples(ds, "nola", threshold=0.4)
    panel.on_change_selected(PanelCtx(ds, state=pc.state).ctx)
    assert len(counted) == 4
    # a move in the panel: the flagging's own counts serve the App's events that follow it
    pc = PanelCtx(ds, state=pc.state, value=0.42)
    panel.on_slider(pc.ctx)
    panel.on_change_extended_selection(PanelCtx(ds, state=pc.state).ctx)
    assert len(counted) == 4 and pc.state["applied_threshold"] == 0.42
    panel.on_refresh(PanelCtx(ds, state=pc.state).ctx)
    assert len(counted) == 5  # the person asked: read again


def test_data_version_changes_with_every_kind_of_write(review_ds):
    from fiftyone_nola.stages import review as rv

    ds = review_ds
    sample = ds.first()
    seen = [rv.data_version(ds)]
    assert rv.data_version(ds) == seen[-1]  # reading changes nothing
    writes = [
        lambda: (sample.set_field("nola.confidence", 0.01), sample.save()),  # a sample edited in FiftyOne
        lambda: ds.select(ds.first().id).tag_samples("x"),  # tags, as the App's tagging writes them
        lambda: ds.delete_samples(ds.last().id),  # stamps nothing: the count changes
        lambda: (setattr(ds, "info", {**ds.info, "x": 1}), ds.save()),  # the dataset's document
    ]
    for write in writes:
        write()
        rv.reload_dataset(ds)
        seen.append(rv.data_version(ds))
        assert seen[-1] != seen[-2]


def test_opening_the_panel_writes_nothing_and_shows_the_stored_threshold(review_ds):
    """A page reload (the panel opens again, the App sends its controls' defaults back) keeps the
    stored threshold and writes nothing; the first open of an unflagged dataset writes nothing."""
    from fiftyone_nola.stages import review as rv
    from operators.panels import SLIDER, NolaPanel

    ds, panel = review_ds, NolaPanel()
    before = modified(ds)
    pc = PanelCtx(ds)
    panel.on_load(pc.ctx)
    assert not pc.state["counts"]["flagged_yet"] and pc.state["counts"]["would_flag"] == 8
    pc = PanelCtx(ds, state=pc.state, value=0.5)  # the slider's default sent back
    panel.on_slider(pc.ctx)
    assert modified(ds) == before and not rv.settings(ds)

    rv.flag_samples(ds, "nola", threshold=0.4)
    before = modified(ds)
    pc = PanelCtx(ds)  # the page reloads: a fresh panel state
    panel.on_load(pc.ctx)
    assert pc.state["applied_threshold"] == 0.4 and pc.state[SLIDER] == 0.4
    props = panel.render(pc.ctx).type.properties
    assert props[SLIDER].default == 0.4  # the control's default is the stored threshold
    pc = PanelCtx(ds, state=pc.state, value=0.4)  # the App echoes that default back
    panel.on_slider(pc.ctx)
    assert pc.state["counts"]["flagged"] == 7 and modified(ds) == before
    assert rv.settings(ds)["threshold"] == 0.4


def test_threshold_controls_flag_once_per_committed_value(review_ds):
    """The slider commits once per drag and the number once when left (never per keystroke):
    each commit flags once; the value the App sends back for a control is not a new move."""
    from fiftyone_nola.stages import review as rv
    from operators.panels import NUMBER, SLIDER, NolaPanel

    ds, panel, pid = review_ds, NolaPanel(), "threshold-panel"
    pc = PanelCtx(ds, panel_id=pid)
    panel.on_load(pc.ctx)
    st = pc.state
    calls = []
    flag = rv.flag_samples

    def counting(*args, **kwargs):
        calls.append(kwargs.get("threshold"))
        return flag(*args, **kwargs)

    import operators.panels as panels_module

    panels_module.rv.flag_samples = counting
    try:
        for moved, value, flagged in ((SLIDER, 0.3, 5), (NUMBER, 0.45, 7), (SLIDER, 0.8, 12)):
            pc = PanelCtx(ds, state=st, panel_id=pid, value=value)
            (panel.on_slider if moved == SLIDER else panel.on_number)(pc.ctx)
            st = pc.state
            assert st[SLIDER] == value and st["applied_threshold"] == value and st["counts"]["flagged"] == flagged
            assert len(ds.match_tags(rv.FLAGGED_TAG)) == flagged
            assert any(n.endswith("set_view") for n in pc.op_names())  # the grid follows the threshold
            # the number field shows the applied value: its name follows it (a new, filled field)
            names = [n for n in panel.render(pc.ctx).type.properties if n.startswith(NUMBER)]
            assert names == [f"{NUMBER}_{round(value * 10000)}"]
            # the App echoes the value set into the slider: ignored, nothing re-flagged or re-filtered
            pc = PanelCtx(ds, state=st, panel_id=pid, value=value)
            panel.on_slider(pc.ctx)
            assert pc.ops() == [] and pc.state == st
        assert calls == [0.3, 0.45, 0.8]
        # a late echo of an older slider value does not pull the threshold back
        pc = PanelCtx(ds, state=st, panel_id=pid, value=0.6)
        panel.on_slider(pc.ctx)
        pc = PanelCtx(ds, state=pc.state, panel_id=pid, value=0.55)
        panel.on_slider(pc.ctx)
        st = pc.state
        pc = PanelCtx(ds, state=st, panel_id=pid, value=0.55)
        panel.on_slider(pc.ctx)
        assert pc.ops() == [] and rv.settings(ds)["threshold"] == 0.55
        # out of range typed: clamped to what is applied
        pc = PanelCtx(ds, state=st, panel_id=pid, value=1.7)
        panel.on_number(pc.ctx)
        assert pc.state[SLIDER] == 1.0 and pc.state["counts"]["flagged"] == 16
    finally:
        panels_module.rv.flag_samples = flag


def test_a_move_in_flight_is_not_set_back_by_another_event(review_ds):
    """Seen in Chromium: the slider moved to 0.39 while the App sent a selection change (after the
    last flagging's grid update) carrying that state; its refresh set the slider back to the
    applied 0.4, the App sent 0.4 as a move after 0.39, and the two re-flagged each other for ever."""
    from fiftyone_nola.stages import review as rv
    from operators.panels import SLIDER, NolaPanel

    ds, panel, pid = review_ds, NolaPanel(), "in-flight-panel"
    pc = PanelCtx(ds, panel_id=pid, value=0.4)
    panel.on_load(pc.ctx)
    panel.on_slider(pc.ctx)
    st = dict(pc.state, **{SLIDER: 0.39})  # the user's move; its on_slider event is not here yet
    pc = PanelCtx(ds, state=st, panel_id=pid, value={})
    panel.on_change_selected(pc.ctx)
    assert pc.state[SLIDER] == 0.39  # left as the user moved it
    pc = PanelCtx(ds, state=pc.state, panel_id=pid, value=0.39)
    panel.on_slider(pc.ctx)
    assert rv.settings(ds)["threshold"] == 0.39 and pc.state["applied_threshold"] == 0.39
    # a threshold applied elsewhere (another tab, a notebook) still reaches the slider
    rv.flag_samples(ds, "nola", threshold=0.6)
    pc = PanelCtx(ds, state=pc.state, panel_id=pid, value={})
    panel.on_change_selected(pc.ctx)
    assert pc.state[SLIDER] == 0.6


def test_stage_progress_polled_from_the_delegated_run(review_ds):
    """A stage launched delegated: the panel polls its run and shows done/total on the stage's row;
    when the run ends the timer stops and everything is refreshed."""
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionContext, ExecutionProgress

    from operators.panels import NolaPanel

    ds, panel = review_ds, NolaPanel()
    pc = PanelCtx(ds)
    panel.on_load(pc.ctx)
    assert pc.state["jobs"] == [] and "poll" not in panel.render(pc.ctx).type.properties
    pc = PanelCtx(ds, state=pc.state, row=0)
    panel.on_run_stage(pc.ctx)  # "Run" on a stage row opens its form, then reports back
    ((name, params),) = pc.ops()
    assert name.endswith("prompt_user_for_operation") and params["operator_uri"] == f"{PLUGIN}/compute_embeddings"
    assert params["on_success"].endswith("#on_launched")

    svc = DelegatedOperationService()
    job = svc.queue_operation(
        f"{PLUGIN}/compute_embeddings",
        context=ExecutionContext(request_params={"dataset_name": ds.name, "params": {"family": "clip"}}),
    )
    try:
        pc = PanelCtx(ds, state=pc.state)
        panel.on_launched(pc.ctx)
        rows = {r["stage"]: r["state"] for r in pc.state["stages"]}
        assert rows["CLIP embeddings"] == "queued" and rows["DINO embeddings"] == "not run"
        svc.set_running(job.id)
        svc.set_progress(job.id, ExecutionProgress(0.3, "Embedding images 12/40"))
        pc = PanelCtx(ds, state=pc.state)
        panel.on_poll(pc.ctx)
        rows = {r["stage"]: r["state"] for r in pc.state["stages"]}
        assert rows["CLIP embeddings"] == "running 12/40 (30%)" and rows["DINO embeddings"] == "not run"
        props = panel.render(pc.ctx).type.properties
        assert props["poll"].view.to_json()["on_interval"].endswith("#on_poll")
        assert "Embedding images 12/40 (30%)" in props["jobs_text"].default
        svc.set_completed(job.id)
        pc = PanelCtx(ds, state=pc.state)
        panel.on_poll(pc.ctx)
        rows = {r["stage"]: r["state"] for r in pc.state["stages"]}
        assert pc.state["jobs"] == [] and rows["CLIP embeddings"] == "fresh"
        assert "poll" not in panel.render(pc.ctx).type.properties
    finally:
        svc.delete_operation(job.id)


def test_model_names_are_cut_with_an_ellipsis():
    from fiftyone_nola.stages.review_stages import _short

    assert _short("a" * 39) == "a" * 39 and _short("b" * 60) == "b" * 39 + "…"


def test_outputs_link_to_the_model_evaluation_panel(review_ds):
    import fiftyone as fo
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    from operators.panels import MODEL_EVALUATION_PANEL, NolaPanel

    pc = PanelCtx(review_ds)
    NolaPanel().on_open_evaluation(pc.ctx)
    assert [(n, p["name"]) for n, p in pc.ops()] == [("open_panel", MODEL_EVALUATION_PANEL)]
    pc = PanelCtx(review_ds)
    NolaPanel().on_evaluate(pc.ctx)  # "Evaluate…" opens the evaluate_labels form
    assert [p["operator_uri"] for n, p in pc.ops()] == [f"{PLUGIN}/evaluate_labels"]
    review_ds.set_values("ground_truth", [fo.Classification(label=CLASSES[i % 4]) for i in range(len(review_ds))])
    r = foo.execute_operator(
        f"{PLUGIN}/evaluate_labels",
        ctx={"dataset": review_ds, "params": {"pred_field": "nola", "gt_field": "ground_truth"}},
    )
    assert r.error is None and "Open Model Evaluation" in r.result["summary"]
    op = foo.get_operator(f"{PLUGIN}/evaluate_labels")
    out = op.resolve_output(ExecutionContext(request_params={"dataset_name": review_ds.name, "params": {}}))
    button = out.type.properties["open_model_evaluation"].view.to_json()
    assert button["operator"] == "open_panel" and button["params"]["name"] == MODEL_EVALUATION_PANEL


def test_review_buttons_act_on_a_lasso_in_the_map(review_ds):
    """Points lassoed in the Embeddings map reach the panel as the App's extended selection: the
    panel counts them, its buttons act on them, and the lasso is cleared afterwards."""
    from operators.panels import NolaPanel

    ds, panel = review_ds, NolaPanel()
    lassoed = ds.values("id")[4:9]
    lasso = {"selection": lassoed, "scope": "embeddings"}
    pc = PanelCtx(ds, extended_selection=lasso)
    panel.on_load(pc.ctx)
    assert pc.state["selection"] == 5
    pc = PanelCtx(ds, state=pc.state, extended_selection=lasso)
    panel.on_change_extended_selection(pc.ctx)
    assert pc.state["selection"] == 5
    pc = PanelCtx(ds, state=pc.state, extended_selection=lasso)
    panel.on_reject(pc.ctx)
    assert sorted(ds.match_tags("nola:rejected").values("id")) == sorted(lassoed)
    cleared = [p for n, p in pc.ops() if n.endswith("set_extended_selection")]
    assert cleared and cleared[0]["clear"] and pc.state["selection"] == 0


def test_concurrent_threshold_moves_never_break_and_the_last_one_holds(review_ds):
    """The App runs each slider event in its own thread: overlapping re-flaggings of one dataset
    raised 'view_stages' errors reading a saved view another thread was rewriting, and a reload
    between another thread's steps left references to deleted saved views."""
    import threading

    from fiftyone_nola.stages import review as rv

    errors, barrier = [], threading.Barrier(4)

    def move(thresholds):
        barrier.wait()
        for t in thresholds:
            try:
                rv.reload_dataset(review_ds)  # as the panel's refresh does
                rv.flag_samples(review_ds, "nola", threshold=t)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))

    done = threading.Event()

    def refresh_panels():  # other panel events reload the shared Dataset object meanwhile
        while not done.is_set():
            rv.reload_dataset(review_ds)

    def app_server():  # and FiftyOne's own server does on App requests, taking no lock of ours
        while not done.wait(0.02):  # ~50 requests/s: far more than an App sends
            try:
                review_ds.reload()
                review_ds.list_saved_views()
            except Exception:  # noqa: BLE001, S112 - its failures are not ours; ours are the finding
                continue

    threads = [threading.Thread(target=move, args=([0.3 + 0.05 * ((i + k) % 4) for k in range(6)],)) for i in range(4)]
    others = [threading.Thread(target=refresh_panels), threading.Thread(target=app_server)]
    for t in others + threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in others:
        t.join()
    assert not errors, errors[:3]
    rv.flag_samples(review_ds, "nola", threshold=0.5)
    assert len(review_ds.load_saved_view(rv.VIEW_FLAGGED)) == 8 == len(review_ds.match_tags(rv.FLAGGED_TAG))


def test_evaluating_from_the_panel_opens_the_model_evaluation_panel_without_a_dialog(review_ds):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    from operators.panels import MODEL_EVALUATION_PANEL, NolaPanel

    pc = PanelCtx(review_ds)
    NolaPanel().on_evaluate(pc.ctx)
    ((_, params),) = pc.ops()
    assert params["params"] == {"from_panel": True} and params["on_success"].endswith("#on_evaluated")
    op = foo.get_operator(f"{PLUGIN}/evaluate_labels")
    ctx = ExecutionContext(request_params={"dataset_name": review_ds.name, "params": {"from_panel": True}})
    assert op.resolve_output(ctx) is None  # nothing to close: the dialog ends with the run
    pc = PanelCtx(review_ds)
    NolaPanel().on_evaluated(pc.ctx)
    assert ("open_panel", MODEL_EVALUATION_PANEL) in [(n, (p or {}).get("name")) for n, p in pc.ops()]


def test_audit_mode_draws_walks_the_audit_in_one_click_each_and_reports(synthetic):
    """The panel's Audit mode: draw, then each audit sample takes one click in the sample view and
    opens the next audit sample; the estimate, its curve and per-class rows follow; flagging the
    uncertified makes the review queue what the certificate leaves."""
    from fiftyone_nola.stages import audit
    from fiftyone_nola.stages import review as rv
    from operators.panels import NolaPanel
    from operators.sample_panel import NolaSampleReview

    ds, grid, card = synthetic(600, seed=7), NolaPanel(), NolaSampleReview()
    rv.flag_samples(ds, "nola", threshold=0.5)
    pc = PanelCtx(ds, value="audit")
    grid.on_mode(pc.ctx)
    assert pc.state["audit"] == {"drawn": 0} and "audit_draw" in names(grid.render(pc.ctx))
    pc = PanelCtx(ds, state=pc.state, value=40)
    grid.on_audit_n(pc.ctx)
    pc = PanelCtx(ds, state=pc.state)
    grid.on_audit_draw(pc.ctx)
    st = pc.state
    drawn = st["audit"]["drawn"]
    assert drawn > 10 and st["audit"]["audited"] == 0 and "set_view" in " ".join(pc.op_names())
    # the draw added fields, and the new view alone makes the App load the dataset's page with
    # them: a dataset reload beside it restored the App server's older view and panel state (the
    # full grid and the Draw form came back, seen in Chromium under load, the reload sent before
    # or after the view)
    ops = [n.split("/")[-1] for n in pc.op_names()]
    assert "set_view" in ops and "reload_dataset" not in ops
    # the grid already shows the audit (Draw set it): opening its first sample changes nothing
    # else, since a view change or a dataset reload landing after it would close the sample again
    from operators.audit_section import audit_view

    pc = PanelCtx(ds, state=st, view=audit_view(ds))
    grid.on_audit_start(pc.ctx)
    assert [n.split("/")[-1] for n in pc.op_names()] == ["open_sample"]
    pc = PanelCtx(ds, state=st)  # from another grid: the view is set once, no reload
    grid.on_audit_start(pc.ctx)
    assert [n.split("/")[-1] for n in pc.op_names()] == ["set_view", "open_sample"]
    (current,) = [p["id"] for n, p in pc.ops() if n.endswith("open_sample")]
    state = {}
    for i in range(10):  # one click per audit sample: accept, or pick another class
        cpc = PanelCtx(ds, state=state, current_sample=current)
        card.on_change_current_sample(cpc.ctx)
        assert audit.AUDIT_TAG in cpc.state["card"]["tags"] and cpc.state["progress"]["audited"] == i
        pred = cpc.state["card"]["prediction"]
        other = next(c for c in ds.default_classes if c != pred)
        cpc = PanelCtx(ds, state=cpc.state, current_sample=current, **({"label": other} if i % 3 == 2 else {}))
        (card.on_pick if i % 3 == 2 else card.on_accept)(cpc.ctx)
        (current,) = [p["id"] for n, p in cpc.ops() if n.endswith("open_sample")]
        assert audit.AUDIT_TAG in ds[current].tags  # the next one is the audit's, not the review queue's
        state = cpc.state
    assert audit.audit_progress(ds)["audited"] == 10
    pc = PanelCtx(ds, state=st)
    grid.on_change_current_sample(pc.ctx)  # back to the grid
    a = pc.state["audit"]
    assert a["audited"] == 10 and 0 <= a["accuracy_low"] <= a["accuracy"] <= a["accuracy_high"] <= 1
    assert a["per_class"] and "statement" in a
    assert {"audit_curve", "flag_uncertified", "audit_classes"} <= names(grid.render(pc.ctx))
    # the App put back the grid and panel state from before the draw (1 browser run in 7): its
    # view change shows the audit as the dataset has it
    before_draw = {k: v for k, v in st.items() if k not in ("audit", "audit_progress")}
    pc = PanelCtx(ds, state={**before_draw, "audit": {"drawn": 0}}, __method__="on_change_view")
    grid.execute(pc.ctx)
    assert pc.state["audit"]["drawn"] == drawn and "Audit progress" in pc.state["audit_progress"]
    # in Review mode it changes nothing, and is answered without a render
    pc = PanelCtx(ds, state={**pc.state, "mode": "review"}, __method__="on_change_view")
    grid.execute(pc.ctx)
    assert pc.op_names() == []
    pc = PanelCtx(ds, state=pc.state)
    grid.on_flag_uncertified(pc.ctx)
    tau = audit.audit_report(ds)["threshold"]
    queued = set(ds.match_tags(rv.REVIEW_TAG).values("nola.confidence"))
    assert pc.state["mode"] == "review" and queued and all(c < (tau or 2.0) for c in queued)


def test_drawing_an_audit_survives_the_app_servers_reloads(synthetic):
    """In the App, FiftyOne's server reloads the shared Dataset object while a panel event draws
    an audit: the draw's new fields briefly vanished ('Dataset has no field nola_audit_pi', seen in
    the browser). Draws are review writes: one at a time, retried from the database's state."""
    import threading

    from fiftyone_nola.stages import audit

    ds = synthetic(400, seed=8)
    errors, done = [], threading.Event()

    def app_server():
        while not done.wait(0.02):  # ~50 requests/s: far more than an App sends
            try:
                ds.reload()
            except Exception:  # noqa: BLE001, S112 - its failures are not ours; ours are the finding
                continue

    t = threading.Thread(target=app_server)
    t.start()
    try:
        for seed in range(6):
            try:
                audit.draw_audit(ds, 30, seed=seed, replace_existing=True)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))
    finally:
        done.set()
        t.join()
    assert not errors, errors[:3]
    assert audit.audit_progress(ds)["drawn"] > 0
