"""The review workspace without a browser: the pure queue/threshold/propagation maths, the
FiftyOne stage functions, the Brain runs on the stored vectors, the forms that must not mislead,
and the two panels' callbacks driven through a real ExecutionContext."""

import numpy as np
import pytest
import yaml

from conftest import REPO, cifar_files
from fiftyone_nola.core import review_queue as rq

PLUGIN = yaml.safe_load((REPO / "fiftyone.yml").read_text())["name"]
CLASSES = ["cat", "dog", "ship", "truck"]


# ---------------------------------------------------------------------------- pure maths


def test_flag_mask_threshold_bottom_k_and_missing():
    conf = [0.9, 0.2, None, 0.95, 0.4, 0.8]
    labels = ["cat", "cat", "dog", "dog", "dog", "ship"]
    assert rq.flag_mask(conf, labels, 0.5).tolist() == [False, True, True, False, True, False]
    # bottom-1 per class adds the least confident ship and cat; dog's is 0.4 (a None is flagged anyway)
    assert rq.flag_mask(conf, labels, None, 1).tolist() == [False, True, True, False, True, True]


def test_histogram_splits_at_the_threshold_and_class_rows_round():
    h = rq.histogram([0.05, 0.12, 0.5, 0.51, 0.99, None], bins=10, threshold=0.51)
    assert sum(h["below"]) == 3 and sum(h["above"]) == 2
    assert h["below"][5] == 1 and h["above"][5] == 1  # 0.5 and 0.51 share a bin, split by value
    rows = rq.class_rows(
        ["a", "a", "b"], [0.123456, 0.5, 0.9], [True, True, False], [True, False, False], classes=["a", "b", "c"]
    )
    assert rows[0] == {"class": "a", "count": 2, "mean_confidence": 0.312, "flagged": 2, "reviewed": 1, "remaining": 1}
    assert rows[2]["count"] == 0 and rows[2]["mean_confidence"] is None


def test_review_order_spreads_over_classes_and_clusters():
    # 6 near-duplicates of class a (cluster 0) are the least confident; b and a/cluster 1 must not wait
    conf = [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.30, 0.40]
    labels = ["a"] * 6 + ["b", "a"]
    clusters = [0] * 6 + [0, 1]
    order = rq.review_order(conf, labels, clusters)
    assert order[:3] == [0, 6, 7]  # the most doubtful of each (class, cluster) group first
    assert order[3:] == [1, 2, 3, 4, 5]
    assert rq.review_order(conf, labels)[:2] == [0, 6]  # without clusters: spread over classes


def test_kmeans_separates_obvious_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (10, 4)), rng.normal(5, 0.01, (10, 4))])
    a = rq.kmeans(x, 2)
    assert len(set(a[:10])) == 1 and len(set(a[10:])) == 1 and a[0] != a[10]


def test_propagation_only_to_undecided_similar_neighbours_with_the_same_wrong_label():
    corrections = [("s1", "cat", "dog"), ("s2", "ship", "ship")]  # s2: not a correction
    nb = {"s1": [("n1", 0.95), ("n2", 0.97), ("n3", 0.99), ("n4", 0.5), ("s1", 1.0)], "s2": [("n5", 0.99)]}
    predicted = {"n1": "cat", "n2": "cat", "n3": "truck", "n4": "cat", "n5": "ship"}
    out = rq.propagation_suggestions(corrections, nb, predicted, reviewed={"n2"}, min_similarity=0.9)
    assert out == {"n1": {"label": "dog", "similarity": 0.95, "source": "s1", "wrong": "cat"}}


# ---------------------------------------------------------------------------- dataset fixture


@pytest.fixture
def review_ds(make_dataset):
    """16 real images, predictions with known confidences, no ground truth, and a CLIP store
    whose vectors make sample pairs (0,1), (2,3)... near-duplicates."""
    import fiftyone as fo

    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.core.storage import index_dir
    from fiftyone_nola.stages import runs

    pairs = cifar_files(per_class=4, classes=CLASSES)
    ds = make_dataset([p for p, _ in pairs])  # no ground truth at all
    ids = ds.values("id")
    conf = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.55, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    preds = [CLASSES[i % 4] for i in range(16)]
    ds.set_values("nola", [fo.Classification(label=p, confidence=c) for p, c in zip(preds, conf)])
    ds.set_values("nola_zeroshot", [fo.Classification(label=p, confidence=c / 2) for p, c in zip(preds, conf)])
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 32))
    vecs = np.repeat(base, 2, axis=0) + rng.normal(scale=0.01, size=(16, 32))
    path = index_dir(str(ds._doc.id), "test-clip")
    ix = EmbeddingIndex.create(path, 32, {"dataset_id": str(ds._doc.id)})
    ix.add(ids, vecs.astype(np.float32))
    ix.save()
    runs.record_run(
        ds,
        "nola_embeddings_clip",
        "embeddings.clip",
        {"spec": None},
        {"index_path": str(path), "index_size": 16, "samples": 16},
    )
    from fiftyone_nola.stages.review_workspace import store_class_list

    store_class_list(ds, CLASSES)
    return ds


# ---------------------------------------------------------------------------- stage functions


@pytest.mark.integration
def test_class_list_is_stored_with_a_label_schema(review_ds):
    from fiftyone_nola.stages import review_workspace as rw

    assert review_ds.default_classes == CLASSES and rw.class_list(review_ds) == CLASSES
    schema = review_ds.label_schemas.get("nola_reviewed")
    assert schema and schema["classes"] == CLASSES and schema["component"] == "dropdown"


@pytest.mark.integration
def test_flagging_queue_views_and_decisions(review_ds):
    from fiftyone_nola.stages import review_workspace as rw
    from fiftyone_nola.stages.review import ACCEPTED_TAG, REVIEW_TAG

    ds = review_ds
    pv = rw.preview(ds, "nola", 0.5)
    assert pv["flagged"] == 8 and pv["remaining"] == 8 and sum(pv["histogram"]["below"]) == 8
    s = rw.flag_samples(ds, "nola", threshold=0.5, bottom_k=1)
    # bottom-1 per class adds nothing below 0.5 here: exactly the 8 under the threshold
    assert s["flagged"] == 8 and s["queue"] == 8
    assert len(ds.load_saved_view(rw.VIEW_FLAGGED)) == 8
    queue = rw.queue_ids(ds)
    assert len(queue) == 8 and set(queue) == set(ds.match_tags(rw.FLAGGED_TAG).values("id"))
    # the queue starts with the least confident, then spreads over classes
    confs = dict(zip(*ds.values(["id", "nola.confidence"])))
    assert confs[queue[0]] == 0.05
    assert len({ds[i].nola.label for i in queue[:4]}) >= 3

    first, second = queue[0], queue[1]
    rw.decide(ds, [first], "accept")
    r = rw.decide(ds, [second], "correct", "truck")
    assert r["queue"] == 6 and len(ds.load_saved_view(rw.VIEW_QUEUE)) == 6  # the worklist shrinks
    assert len(ds.load_saved_view(rw.VIEW_FLAGGED)) == 8  # the flagged set does not
    assert ds[second].nola_reviewed.label == "truck" and ACCEPTED_TAG in ds[second].tags
    # The views select by tag: moving the threshold or reviewing changes tags, never the saved
    # views' documents (replacing them while the App server reloads its Dataset corrupts them).
    view_docs = {v.name: v.id for v in ds._doc.get_saved_views()}
    rw.flag_samples(ds, "nola", threshold=0.3)
    rw.flag_samples(ds, "nola", threshold=0.5)
    ds.reload()
    assert {v.name: v.id for v in ds._doc.get_saved_views()} == view_docs
    with pytest.raises(Exception, match="not one of"):
        rw.decide(ds, [queue[2]], "correct", "dear")  # a typo never becomes a class
    # picking the model's own label is an accept, with no correction stored
    third = queue[2]
    rw.decide(ds, [third], "correct", ds[third].nola.label)
    assert ds[third].nola_reviewed is None and ACCEPTED_TAG in ds[third].tags

    # re-flagging never re-queues what a person decided
    s = rw.flag_samples(ds, "nola", threshold=0.6)
    assert s["flagged"] == 9 and s["queue"] == 6 and REVIEW_TAG not in ds[first].tags


@pytest.mark.integration
def test_propagation_suggests_never_accepts(review_ds):
    from fiftyone_nola.stages import review_card as rc
    from fiftyone_nola.stages import review_workspace as rw
    from fiftyone_nola.stages.review import ACCEPTED_TAG, REVIEW_TAG

    ds = review_ds
    ids = ds.values("id")
    # samples 0 and 1 are near-duplicates; 0 is 'cat' corrected to 'dog'; 1 is predicted 'dog' -> no
    # same-wrong-label neighbour. Make 1 'cat' too, so it carries the same wrong label.
    import fiftyone as fo

    s1 = ds[ids[1]]
    s1.nola = fo.Classification(label="cat", confidence=0.1)
    s1.save()
    rw.decide(ds, [ids[0]], "correct", "dog")
    preview = rc.propagate_corrections(ds, "nola", 0.9, apply=False)
    assert preview["suggested"] == 1 and not ds.has_sample_field(rw.SUGGESTED_FIELD)
    r = rc.propagate_corrections(ds, "nola", 0.9)
    assert r["ids"] == [ids[1]] and r["by_label"] == {"dog": 1}
    s1 = ds[ids[1]]
    assert s1.nola_suggested.label == "dog" and rw.SUGGESTED_TAG in s1.tags and REVIEW_TAG in s1.tags
    assert ACCEPTED_TAG not in s1.tags and s1.nola_reviewed is None  # a suggestion, not a decision
    assert rc.propagate_corrections(ds, "nola", 0.999999, apply=False)["suggested"] == 0
    card = rc.sample_card(ds, ids[1])
    assert card["suggestion"] == "dog" and card["neighbours"][0]["id"] == ids[0]
    rw.decide(ds, [ids[1]], "correct", "dog")
    assert rw.SUGGESTED_TAG not in ds[ids[1]].tags


@pytest.mark.integration
def test_brain_runs_on_the_stored_vectors(review_ds):
    import fiftyone.brain as fob  # noqa: F401

    from fiftyone_nola.stages.brain_runs import register_brain_runs, visualization_method

    ds = review_ds
    r = register_brain_runs(ds, "clip")
    assert r["similarity"] in ds.list_brain_runs() and r["visualization"] in ds.list_brain_runs()
    assert r["method"] == visualization_method(16) == "pca"
    sim = ds.load_brain_results(r["similarity"])
    first = ds.first().id
    near = ds.sort_by_similarity(first, k=2, brain_key=r["similarity"]).values("id")
    assert near[0] == first and near[1] == ds.values("id")[1]  # its near-duplicate
    assert sim.total_index_size == 16
    viz = ds.load_brain_results(r["visualization"])
    assert viz.points.shape == (16, 2)
    register_brain_runs(ds, "clip")  # re-registering replaces, never piles up
    assert sorted(ds.list_brain_runs()) == sorted([r["similarity"], r["visualization"]])
    assert register_brain_runs(ds, "dino") == {}  # no store: nothing, no error
    assert visualization_method(1000) in ("umap", "tsne") and visualization_method(10**6) in ("umap", "pca")


# ---------------------------------------------------------------------------- forms


def run(name, dataset, selected=None, **params):
    import fiftyone.operators as foo

    ctx = {"dataset": dataset, "params": params}
    if selected is not None:
        ctx["selected"] = selected
    try:
        return foo.execute_operator(f"{PLUGIN}/{name}", ctx=ctx)
    except Exception as e:  # validation refusals are raised by execute_operator
        return type("Refused", (), {"error": str(e), "result": None})()


def form(name, dataset, **params):
    """The resolved input form of an operator, as the App would render it."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    op = foo.get_operator(f"{PLUGIN}/{name}")
    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": params})
    return op.resolve_input(ctx).type.properties


@pytest.mark.integration
def test_no_calibration_against_the_predictions_themselves(review_ds):
    props = form("review_low_confidence", review_ds, field="nola")
    gt = props["gt_field"]
    assert gt.default == "(none)"
    offered = [c.value for c in gt.type.choices] if hasattr(gt.type, "choices") else gt.type.values
    assert "nola" not in offered and "nola_zeroshot" not in offered  # predictions are not ground truth
    r = run("review_low_confidence", review_ds, field="nola", threshold=0.5, bottom_k=0)
    assert r.error is None and "calibration_plot" not in r.result and "ece" not in r.result["result"]
    assert "No ground truth chosen" in r.result["summary"]
    r = run("review_low_confidence", review_ds, field="nola", threshold=0.5, gt_field="nola")
    assert r.error is not None and "predictions field itself" in str(r.error)
    from fiftyone_nola.stages import review

    with pytest.raises(Exception, match="predictions field itself"):
        review.calibration(review_ds, "nola", "nola")


@pytest.mark.integration
def test_review_table_is_rounded_and_shows_ece_with_ground_truth(review_ds):
    import fiftyone as fo

    ds = review_ds
    ds.set_values("ground_truth", [fo.Classification(label=CLASSES[i % 2]) for i in range(len(ds))])
    r = run("review_low_confidence", ds, field="nola", threshold=0.5, gt_field="ground_truth")
    assert r.error is None, r.error
    assert "ECE" in r.result["summary"] and r.result["result"]["ece"] == round(r.result["result"]["ece"], 3)
    assert all(len(str(row["mean_confidence"]).split(".")[-1]) <= 3 for row in r.result["result"]["table"])


@pytest.mark.integration
def test_correction_outside_the_class_list_is_refused_in_the_form(review_ds):
    ids = review_ds.values("id")
    props = form("mark_reviewed", review_ds, action="correct")
    assert props["label"].type.values == CLASSES  # a dropdown of the dataset's classes
    assert "label" not in form("mark_reviewed", review_ds, action="accept")  # inputs follow the action
    r = run("mark_reviewed", review_ds, selected=ids[:1], action="correct", label="dear")
    assert r.error is not None
    assert not review_ds.has_sample_field("nola_reviewed") or review_ds.count("nola_reviewed.label") == 0
    r = run("mark_reviewed", review_ds, selected=ids[:1], action="correct", label="dog")
    assert r.error is None and review_ds[ids[0]].nola_reviewed.label == "dog"


@pytest.mark.integration
def test_export_form_defaults_and_empty_export_message(review_ds, tmp_path):
    props = form("export_accepted", review_ds)
    assert props["export_dir"].default and "exports" in props["export_dir"].default
    assert props["view_target"].default == "DATASET"
    # nothing accepted: the form says so, and execution answers with a message, not a traceback
    assert props["nola_problems"].error_message.startswith("Nothing to export")
    from fiftyone_nola.core.errors import InvalidInputError
    from fiftyone_nola.stages.export import export_accepted

    with pytest.raises(InvalidInputError, match="Nothing to export"):
        export_accepted(review_ds, str(tmp_path / "x"), "nola")
    # a leftover selection does not narrow the export
    from fiftyone_nola.stages.review_workspace import decide

    ids = review_ds.values("id")
    decide(review_ds, ids[:3], "accept")
    r = run("export_accepted", review_ds, selected=ids[:1], label_field="nola", export_dir=str(tmp_path / "out"))
    assert r.error is None and r.result["result"]["exported"] == 3


@pytest.mark.integration
def test_evaluation_keys_never_silently_overwrite_and_final_labels(review_ds):
    import fiftyone as fo

    ds = review_ds
    ds.set_values("ground_truth", [fo.Classification(label=CLASSES[i % 4]) for i in range(len(ds))])
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth")
    assert r.error is None and r.result["result"]["eval_key"] == "eval_nola"
    assert r.result["result"]["accuracy"] == 1.0
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth")
    assert r.error is not None and "already exists" in str(r.error)
    # a reviewer fixes one label the wrong way round: the final-label evaluation sees it
    from fiftyone_nola.stages.review_workspace import decide

    first = ds.first()
    decide(ds, [first.id], "correct", "ship" if first.nola.label != "ship" else "cat")
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth", final_labels=True)
    assert r.error is None and r.result["result"]["eval_key"] == "eval_nola_final"
    assert r.result["result"]["accuracy"] == round(15 / 16, 3)
    assert set(ds.list_evaluations()) == {"eval_nola", "eval_nola_final"}
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth", overwrite=True)
    assert r.error is None


# ---------------------------------------------------------------------------- panels


class PanelCtx:
    """A real ExecutionContext for a panel event, as the App sends it; records App operations."""

    def __init__(
        self,
        dataset,
        state=None,
        selected=None,
        current_sample=None,
        view=None,
        panel_id="test-panel",
        extended_selection=None,
        **params,
    ):
        from fiftyone.operators.executor import ExecutionContext, Executor

        self.executor = Executor()
        req = {
            "dataset_name": dataset.name,
            "selected": selected or [],
            "extended_selection": extended_selection,
            "params": {"panel_id": panel_id, "panel_state": state if state is not None else {}, **params},
        }
        if current_sample:
            req["current_sample"] = current_sample
        if view is not None:
            from fiftyone.operators.operations import _serialize_view

            req["view"] = _serialize_view(view)
        self.ctx = ExecutionContext(request_params=req, executor=self.executor)

    @property
    def state(self):
        return self.ctx.panel_state

    def ops(self):
        return [
            (r["operator_uri"] if "operator_uri" in r else r.get("operator"), r.get("params"))
            for r in self.executor.to_json()["requests"]
        ]

    def op_names(self):
        return [n for n, _ in self.ops()]


@pytest.mark.integration
def test_grid_panel_callbacks(review_ds):
    from fiftyone_nola.stages import review_workspace as rw
    from operators.panels import NolaPanel

    ds, panel = review_ds, NolaPanel()
    pc = PanelCtx(ds)
    panel.on_load(pc.ctx)
    st = pc.state
    assert st["ready"] and st["applied_threshold"] == 0.5 and st["counts"]["flagged"] == 8
    assert [r["class"] for r in st["classes"]] == CLASSES
    assert any(r["stage"] == "CLIP embeddings" and r["state"] == "fresh" for r in st["stages"])
    panel.render(pc.ctx)  # renders without error

    # moving the threshold flags live, and the grid follows
    pc = PanelCtx(ds, state=st, value=0.3)
    panel.on_slider(pc.ctx)
    assert pc.state["counts"]["flagged"] == 5 and pc.state["applied_threshold"] == 0.3
    assert len(ds.match_tags(rw.FLAGGED_TAG)) == 5
    assert "set_view" in " ".join(pc.op_names())

    # a class row filters the grid to that class's flagged samples
    pc = PanelCtx(ds, state=pc.state, row=1)
    panel.on_class_click(pc.ctx)
    view_ops = [p for n, p in pc.ops() if n.endswith("set_view")]
    assert view_ops and pc.state["selected_class"] == "dog"

    # buttons act on the selection, then clear it
    ids = rw.queue_ids(ds)
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


@pytest.mark.integration
def test_sample_panel_one_click_moves_through_the_queue(review_ds):
    from fiftyone_nola.stages import review_workspace as rw
    from operators.sample_panel import NolaSampleReview

    ds, panel = review_ds, NolaSampleReview()
    rw.flag_samples(ds, "nola", threshold=0.5)
    queue = rw.queue_ids(ds)
    state, current = {}, queue[0]
    opened = []
    for i in range(5):  # each sample: exactly one click, alternating accept / pick a class
        pc = PanelCtx(ds, state=state, current_sample=current)
        panel.on_change_current_sample(pc.ctx)
        assert pc.state["card"]["id"] == current and pc.state["card"]["neighbours"]
        panel.render(pc.ctx)
        pc = PanelCtx(ds, state=pc.state, current_sample=current, **({"label": "truck"} if i % 2 else {}))
        (panel.on_pick if i % 2 else panel.on_accept)(pc.ctx)
        nxt = [p["id"] for n, p in pc.ops() if n.endswith("open_sample")]
        assert len(nxt) == 1 and nxt[0] != current
        opened.append(current)
        state, current = pc.state, nxt[0]
    assert len(rw.queue_ids(ds)) == len(queue) - 5 and state["progress"]["reviewed"] == 5
    assert ds.match_tags("nola:accepted").count() == 5
    assert set(opened) == set(queue[:5])


@pytest.mark.integration
def test_threshold_slider_and_number_mirror_each_other(review_ds):
    """Whichever control moves, the other follows, the count updates and the grid shows the
    flagged samples; the value the App sends back for the follower is not a new move."""
    from fiftyone_nola.stages import review_workspace as rw
    from operators.panels import NUMBER, SLIDER, NolaPanel

    ds, panel, pid = review_ds, NolaPanel(), "mirror-panel"
    pc = PanelCtx(ds, panel_id=pid)
    panel.on_load(pc.ctx)
    assert pc.state[SLIDER] == pc.state[NUMBER] == 0.5
    st = pc.state
    for moved, other, value, flagged in (
        (SLIDER, NUMBER, 0.3, 5),
        (NUMBER, SLIDER, 0.45, 7),
        (SLIDER, NUMBER, 0.8, 12),
    ):
        pc = PanelCtx(ds, state=st, panel_id=pid, value=value)
        (panel.on_slider if moved == SLIDER else panel.on_number)(pc.ctx)
        st = pc.state
        assert st[other] == value and st["applied_threshold"] == value and st["counts"]["flagged"] == flagged
        assert len(ds.match_tags(rw.FLAGGED_TAG)) == flagged
        views = [p for n, p in pc.ops() if n.endswith("set_view")]
        assert views, pc.op_names()  # the grid follows the threshold
        # the App echoes the value set into the follower: ignored, nothing re-flagged or re-filtered
        pc = PanelCtx(ds, state=st, panel_id=pid, value=value)
        (panel.on_number if other == NUMBER else panel.on_slider)(pc.ctx)
        assert pc.ops() == [] and pc.state == st
    # a drag sends several values; a late echo of an older one does not pull the controls back
    pc = PanelCtx(ds, state=st, panel_id=pid, value=0.6)
    panel.on_slider(pc.ctx)
    pc = PanelCtx(ds, state=pc.state, panel_id=pid, value=0.55)
    panel.on_slider(pc.ctx)
    st = pc.state
    for echo in (0.6, 0.55):
        pc = PanelCtx(ds, state=st, panel_id=pid, value=echo)
        panel.on_number(pc.ctx)
        assert pc.ops() == []
    assert rw.settings(ds)["threshold"] == 0.55 and st[NUMBER] == 0.55
    # out of range typed: clamped, and both controls show what is applied
    pc = PanelCtx(ds, state=st, panel_id=pid, value=1.7)
    panel.on_number(pc.ctx)
    assert pc.state[NUMBER] == pc.state[SLIDER] == 1.0 and pc.state["counts"]["flagged"] == 16


@pytest.mark.integration
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


@pytest.mark.integration
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
    r = run("evaluate_labels", review_ds, pred_field="nola", gt_field="ground_truth")
    assert r.error is None and "Open Model Evaluation" in r.result["summary"]
    op = foo.get_operator(f"{PLUGIN}/evaluate_labels")
    out = op.resolve_output(ExecutionContext(request_params={"dataset_name": review_ds.name, "params": {}}))
    button = out.type.properties["open_model_evaluation"].view.to_json()
    assert button["operator"] == "open_panel" and button["params"]["name"] == MODEL_EVALUATION_PANEL


@pytest.mark.integration
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


@pytest.mark.integration
def test_concurrent_threshold_moves_never_break_and_the_last_one_holds(review_ds):
    """The App runs each slider event in its own thread: overlapping re-flaggings of one dataset
    raised 'view_stages' errors reading a saved view another thread was rewriting, and a reload
    between another thread's steps left references to deleted saved views."""
    import threading

    from fiftyone_nola.stages import review_workspace as rw

    errors, barrier = [], threading.Barrier(4)

    def move(thresholds):
        barrier.wait()
        for t in thresholds:
            try:
                rw.reload_dataset(review_ds)  # as the panel's refresh does
                rw.flag_samples(review_ds, "nola", threshold=t)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))

    done = threading.Event()

    def refresh_panels():  # other panel events reload the shared Dataset object meanwhile
        while not done.is_set():
            rw.reload_dataset(review_ds)

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
    rw.flag_samples(review_ds, "nola", threshold=0.5)
    assert len(review_ds.load_saved_view(rw.VIEW_FLAGGED)) == 8 == len(review_ds.match_tags(rw.FLAGGED_TAG))
