"""The review workspace without a browser: the pure queue maths, the FiftyOne stage functions
(flagging, the queue, decisions, propagation, counts), their cost following what changes, the
Brain runs on the stored vectors, and the forms that must not mislead.

The datasets here carry no real images (generated ones where an export copies files), so these
tests need nothing beside the repository."""

from unittest.mock import patch

import numpy as np
import pytest
import yaml

from conftest import REPO, REVIEW_CLASSES, tiny_images
from fiftyone_nola.core import review_queue as rq

PLUGIN = yaml.safe_load((REPO / "fiftyone.yml").read_text())["name"]
CLASSES = REVIEW_CLASSES


# ---------------------------------------------------------------------------- pure maths


def test_review_order_spreads_over_classes_and_clusters():
    # 6 near-duplicates of class a (cluster 0) are the least confident; b and a/cluster 1 must not wait
    conf = [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.30, 0.40]
    labels = ["a"] * 6 + ["b", "a"]
    clusters = [0] * 6 + [0, 1]
    order = rq.review_order(conf, labels, clusters)
    assert order[:3] == [0, 6, 7]  # the most doubtful of each (class, cluster) group first
    assert order[3:] == [1, 2, 3, 4, 5]
    assert rq.review_order(conf, labels)[:2] == [0, 6]  # without clusters: spread over classes


def test_propagation_only_to_undecided_similar_neighbours_with_the_same_wrong_label():
    corrections = [("s1", "cat", "dog"), ("s2", "ship", "ship")]  # s2: not a correction
    nb = {"s1": [("n1", 0.95), ("n2", 0.97), ("n3", 0.99), ("n4", 0.5), ("s1", 1.0)], "s2": [("n5", 0.99)]}
    predicted = {"n1": "cat", "n2": "cat", "n3": "truck", "n4": "cat", "n5": "ship"}
    out = rq.propagation_suggestions(corrections, nb, predicted, reviewed={"n2"}, min_similarity=0.9)
    assert out == {"n1": {"label": "dog", "similarity": 0.95, "source": "s1", "wrong": "cat"}}


# ---------------------------------------------------------------------------- dataset fixture


# ---------------------------------------------------------------------------- counts


def _reference_summary(ds, threshold, classes):
    """What the panel must show, computed in numpy from every sample's values."""
    from fiftyone_nola.core.names import DECIDED_TAGS, FLAGGED_TAG, REVIEW_TAG

    labels, conf, tags = ds.values(["nola.label", "nola.confidence", "tags"])
    c = np.array([np.nan if x is None else x for x in conf])
    flagged = np.array([FLAGGED_TAG in t for t in tags])
    decided = np.array([any(d in t for d in DECIDED_TAGS) for t in tags])
    below = np.isnan(c) | np.array([lab is None for lab in labels]) | (c < threshold)
    edges = np.clip(np.floor(np.nan_to_num(c, nan=0) * 20), 0, 19).astype(int)
    rows = []
    for name in classes:
        m = np.array([lab == name for lab in labels])
        rows.append(
            {
                "class": name,
                "count": int(m.sum()),
                "mean_confidence": round(float(np.nanmean(c[m])), 3) if m.any() else None,
                "flagged": int((m & flagged).sum()),
                "reviewed": int((m & flagged & decided).sum()),
                "remaining": int((m & flagged & ~decided).sum()),
            }
        )
    finite = np.isfinite(c)
    return {
        "samples": len(labels),
        "flagged": int(flagged.sum()),
        "reviewed": int((flagged & decided).sum()),
        "queue": sum(REVIEW_TAG in t for t in tags),
        "would_flag": int(below.sum()),
        "below": np.bincount(edges[finite & below], minlength=20).tolist(),
        "above": np.bincount(edges[finite & ~below], minlength=20).tolist(),
        "classes": rows,
    }


@pytest.mark.parametrize("parts", [1, 3])
def test_counts_histogram_and_class_table_come_from_one_aggregation_and_match_numpy(synthetic, parts, monkeypatch):
    """The database's counts equal a per-sample computation, with decisions, corrections,
    rejections, samples with no prediction and a class no sample has; also when a large dataset
    is counted in parallel ranges (here 3 ranges of 600 samples)."""
    import fiftyone as fo

    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages.review import stats

    monkeypatch.setattr(stats, "SPLIT_FROM", 1 if parts > 1 else 10**9)
    monkeypatch.setattr(stats, "_parts", lambda: parts)
    ds = synthetic(600, seed=3)
    one = len(stats._grouped(ds, stats.ReviewCounts("nola", 0.5), parts=1))
    groups = len(stats._grouped(ds, stats.ReviewCounts("nola", 0.5)))
    assert groups > one if parts > 1 else groups == one  # counted in ranges: a key repeats across them
    classes = [*ds.default_classes, "unicorn"]
    ds.default_classes = classes
    ds.save()
    ids = ds.values("id")
    ds.set_values("nola", {i: None for i in ids[:7]}, key_field="id")  # no prediction: always flagged
    rv.flag_samples(ds, "nola", threshold=0.55)
    queue = rv.queue_ids(ds, limit=40)
    rv.decide(ds, queue[:10], "accept")
    rv.decide(ds, queue[10:15], "reject")
    pred = ds[queue[20]].nola
    rv.decide(ds, queue[20:21], "correct", next(c for c in classes[:4] if c != (pred and pred.label)))
    rv.decide(ds, ids[-5:], "accept")  # decided but not flagged
    for t in (0.55, 0.3, 0.8):
        got = rv.summary(ds, "nola", t)
        want = _reference_summary(ds, t, classes)
        assert {k: got[k] for k in ("samples", "flagged", "reviewed", "queue", "would_flag")} == {
            k: want[k] for k in ("samples", "flagged", "reviewed", "queue", "would_flag")
        }
        assert got["histogram"]["below"] == want["below"] and got["histogram"]["above"] == want["above"]
        assert got["classes"] == want["classes"]
    assert got["decided"] == {"accepted": 15, "corrected": 1, "rejected": 5}
    assert isinstance(ds.first().nola, (fo.Classification, type(None)))


# ---------------------------------------------------------------------------- stage functions


def test_class_list_is_stored_with_a_label_schema(review_ds):
    from fiftyone_nola.stages import review as rv

    assert review_ds.default_classes == CLASSES and rv.class_list(review_ds) == CLASSES
    schema = review_ds.label_schemas.get("nola_reviewed")
    assert schema and schema["classes"] == CLASSES and schema["component"] == "dropdown"


def test_flagging_queue_views_and_decisions(review_ds):
    from fiftyone_nola.stages import review as rv

    ds = review_ds
    pv = rv.summary(ds, "nola", 0.5)
    assert pv["would_flag"] == 8 and pv["flagged"] == 0 and sum(pv["histogram"]["below"]) == 8
    s = rv.flag_samples(ds, "nola", threshold=0.5, bottom_k=1)
    # bottom-1 per class adds nothing below 0.5 here: exactly the 8 under the threshold
    assert s["flagged"] == 8 and s["queue"] == 8
    assert len(ds.load_saved_view(rv.VIEW_FLAGGED)) == 8
    queue = rv.queue_ids(ds)
    assert len(queue) == 8 and set(queue) == set(ds.match_tags(rv.FLAGGED_TAG).values("id"))
    # the queue starts with the least confident, then spreads over classes
    confs = dict(zip(*ds.values(["id", "nola.confidence"])))
    assert confs[queue[0]] == 0.05
    assert len({ds[i].nola.label for i in queue[:4]}) >= 3

    first, second = queue[0], queue[1]
    rv.decide(ds, [first], "accept")
    r = rv.decide(ds, [second], "correct", "truck")
    assert r["left_queue"] == 1 and rv.queue_length(ds) == 6  # the worklist shrinks
    assert len(ds.load_saved_view(rv.VIEW_QUEUE)) == 6
    assert rv.decide(ds, [second], "correct", "truck")["left_queue"] == 0  # decided again: it had left
    assert len(ds.load_saved_view(rv.VIEW_FLAGGED)) == 8  # the flagged set does not
    # a correction has its own tag: corrections can be filtered apart from accepts
    assert ds[second].nola_reviewed.label == "truck" and ds[second].tags == [rv.FLAGGED_TAG, rv.CORRECTED_TAG]
    # The views select by tag: moving the threshold or reviewing changes tags, never the saved
    # views' documents (replacing them while the App server reloads its Dataset corrupts them).
    view_docs = {v.name: v.id for v in ds._doc.get_saved_views()}
    rv.flag_samples(ds, "nola", threshold=0.3)
    rv.flag_samples(ds, "nola", threshold=0.5)
    ds.reload()
    assert {v.name: v.id for v in ds._doc.get_saved_views()} == view_docs
    with pytest.raises(Exception, match="not one of"):
        rv.decide(ds, [queue[2]], "correct", "dear")  # a typo never becomes a class
    # picking the model's own label is an accept, with no correction stored
    third = queue[2]
    rv.decide(ds, [third], "correct", ds[third].nola.label)
    assert ds[third].nola_reviewed is None and rv.ACCEPTED_TAG in ds[third].tags
    # the last decision stands: accepting a corrected sample drops its correction
    rv.decide(ds, [second], "accept")
    assert ds[second].nola_reviewed is None and rv.CORRECTED_TAG not in ds[second].tags

    # re-flagging never re-queues what a person decided
    s = rv.flag_samples(ds, "nola", threshold=0.6)
    assert s["flagged"] == 9 and s["queue"] == 6 and rv.REVIEW_TAG not in ds[first].tags


@pytest.mark.parametrize("parts", [1, 3])
def test_a_threshold_move_writes_only_the_samples_between_the_two_thresholds(synthetic, monkeypatch, parts):
    """Flagging costs what it changes: a move from 0.4 to 0.45 writes the samples whose
    confidence lies in between (and the queue head's priorities), none of the others. On a large
    dataset the band is written in parts at once (here 3, whatever the size)."""
    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages.review import flagging

    monkeypatch.setattr(flagging, "parts_for", lambda samples: parts)
    monkeypatch.setattr(flagging, "QUEUE_HEAD", 30)
    monkeypatch.setattr(flagging, "QUEUE_CANDIDATES", 120)
    ds = synthetic(3000, seed=1)
    rv.flag_samples(ds, "nola", threshold=0.4)
    before = dict(zip(*ds.values(["id", "last_modified_at"])))
    head_before = set(ds.match({rv.QUEUE_FIELD: {"$gt": 0}}).values("id"))
    rv.flag_samples(ds, "nola", threshold=0.45)
    after = dict(zip(*ds.values(["id", "last_modified_at"])))
    head_after = set(ds.match({rv.QUEUE_FIELD: {"$gt": 0}}).values("id"))
    conf = dict(zip(*ds.values(["id", "nola.confidence"])))
    written = {i for i in after if after[i] != before[i]}
    band = {i for i, c in conf.items() if 0.4 <= c < 0.45}
    assert band and band <= written
    assert written <= band | head_before | head_after, "a sample outside the band and the head was written"
    assert len(written) < len(conf) / 5
    # the same threshold again on the same predictions writes nothing at all
    rv.flag_samples(ds, "nola", threshold=0.45)
    assert dict(zip(*ds.values(["id", "last_modified_at"]))) == after
    # flagged is exactly "below the threshold" after moves in both directions
    rv.flag_samples(ds, "nola", threshold=0.2)
    rv.flag_samples(ds, "nola", threshold=0.7)
    flagged = set(ds.match_tags(rv.FLAGGED_TAG).values("id"))
    assert flagged == {i for i, c in conf.items() if c < 0.7}


@pytest.mark.parametrize("parts", [1, 3])
def test_a_threshold_move_counts_only_the_samples_it_moves(synthetic, monkeypatch, parts):
    """A move's counts were a full count of the dataset (~1.2 s of a move at 10^6 samples). They
    are now the counts kept before it, less the band between the two thresholds as it was, plus
    the band as the move left it; a decision updates them by its own samples. Each must equal a
    full count, through decisions, suggestions, a sample without a prediction, and writes from
    elsewhere between moves (which count afresh)."""
    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages.review import flagging, stats

    monkeypatch.setattr(stats, "KEPT_MAX", 2)
    monkeypatch.setattr(flagging, "parts_for", lambda samples: parts)  # the band written and counted in parts
    ds = synthetic(2000, seed=4)
    full = []  # the thresholds of full counts
    real = stats._grouped
    monkeypatch.setattr(
        stats, "_grouped", lambda samples, agg, *a: full.append(agg._threshold) or real(samples, agg, *a)
    )
    present = ["nola"]

    def move(t):
        rv.reload_dataset(ds)
        got = rv.flag_samples(ds, "nola", threshold=t, present=present)
        want = rv.summary(ds, "nola", t, present=present)
        for k in set(want) - {"threshold"}:
            assert got[k] == want[k], (t, k)
        full.remove(t)  # the reference count just made
        return got

    move(0.5)
    assert full == [0.5]  # the first flagging counts everything, and keeps it
    for t in (0.45, 0.62, 0.3):
        move(t)
    assert full == [0.5], "a threshold move counted the whole dataset"
    ids = rv.queue_ids(ds)
    rv.decide(ds, ids[:5], "accept")  # decisions update the kept counts by their own samples
    rv.decide(ds, ids[5:8], "correct", "cat")
    rv.decide(ds, ids[8:10], "reject")
    rv.reload_dataset(ds)
    shown = rv.summary(ds, "nola", 0.3, present=present, version=rv.data_version(ds))  # the panel's
    assert full == [0.5] and shown == {**rv.summary(ds, "nola", 0.3, present=present), "threshold": 0.3}
    full.remove(0.3)
    move(0.6)
    assert full == [0.5], "a decision made the next move count the whole dataset"
    ds.select(ids[10:13]).tag_samples([rv.SUGGESTED_TAG])  # a write from elsewhere
    move(0.55)  # counted afresh
    assert full == [0.5, 0.55]
    for t in (0.2, 0.58, 0.4):
        move(t)
    lost = ds.match({"nola.confidence": {"$gt": 0.9}}).first()
    lost.nola = None  # a prediction gone (a sample re-predicted without one): flagged at any threshold
    lost.save()
    move(0.41)
    assert full == [0.5, 0.55, 0.41]
    move(0.35)
    # a decision, then the panel's count at the applied threshold, then a move: none counts the dataset
    counted = list(full)
    rv.decide(ds, rv.queue_ids(ds)[:1], "accept")
    rv.reload_dataset(ds)
    rv.summary(ds, "nola", 0.35, present=present, version=rv.data_version(ds))
    move(0.37)
    assert full == counted, "the panel or the move counted the dataset after a decision"


def test_new_predictions_are_flagged_afresh(synthetic):
    """A re-run of the predictions (a new run record) invalidates the band shortcut."""
    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages import runs

    ds = synthetic(500, seed=2)
    rv.flag_samples(ds, "nola", threshold=0.5)
    ids = ds.values("id")
    ds.set_values("nola.confidence", [0.99] * len(ids))  # the model is now sure of everything...
    runs.record_run(ds, "nola", "predict", {"model_id": "new"}, {"samples": len(ids)})
    rv.flag_samples(ds, "nola", threshold=0.5)  # ...and the same threshold flags nothing
    assert len(ds.match_tags(rv.FLAGGED_TAG)) == 0 and len(ds.match_tags(rv.REVIEW_TAG)) == 0


def test_the_queue_head_is_ranked_again_once_used_up(synthetic, monkeypatch):
    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages.review import flagging

    monkeypatch.setattr(flagging, "QUEUE_HEAD", 5)
    ds = synthetic(400, seed=4)
    rv.flag_samples(ds, "nola", threshold=0.5)
    queue = len(ds.match_tags(rv.REVIEW_TAG))
    seen = []
    for _ in range(12):  # past two heads
        sid = rv.next_in_queue(ds)
        assert sid not in seen
        seen.append(sid)
        rv.decide(ds, [sid], "accept")
        assert ds.match({rv.QUEUE_FIELD: {"$gt": 0}}).count() <= 5
    assert len(ds.match_tags(rv.REVIEW_TAG)) == queue - 12
    assert ds.match({rv.QUEUE_FIELD: {"$gt": 0}}).count() == 3  # the third head, 2 of 5 decided
    assert not ds.select(seen).match({rv.QUEUE_FIELD: {"$gt": 0}}).count()  # decided: no priority


def test_a_decision_costs_the_same_with_many_samples_held_in_memory(synthetic, monkeypatch):
    """A notebook holding the dataset's Sample objects: each decision re-read every one of them
    (Dataset.reload: one query per sample, 2,000 here); the review reloads the dataset's document."""
    from pymongo.collection import Collection

    from fiftyone_nola.stages import review as rv

    ds = synthetic(2000, seed=5)
    rv.flag_samples(ds, "nola", threshold=0.5)
    queries = {"n": 0}
    for name in ("find", "find_one", "aggregate"):
        original = getattr(Collection, name)

        def counted(self, *args, _original=original, **kwargs):
            queries["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Collection, name, counted)

    def queries_for_a_decision():
        sid = rv.next_in_queue(ds)
        queries["n"] = 0
        rv.decide(ds, [sid], "accept")
        return queries["n"]

    bare = queries_for_a_decision()
    held = list(ds.iter_samples())  # the process now holds 2,000 Sample objects
    with_samples = queries_for_a_decision()
    # FiftyOne re-reads the held copy of the decided sample itself after each tag write (3 here):
    # the cost follows what changed, never the 2,000 samples held
    assert len(held) == 2000 and 0 < bare and with_samples <= bare + 5, (bare, with_samples)


def test_the_review_indexes_are_created_once(synthetic, monkeypatch):
    """One-field indexes are listed by their path: the check missed them, and every flagging and
    queue ranking asked the database to create them again (and said so in the log)."""
    import fiftyone as fo

    from fiftyone_nola.stages import review as rv

    ds = synthetic(50, seed=7)
    rv.ensure_review_schema(ds, "nola")
    assert {"nola.confidence", "tags", "nola.label_1_nola.confidence_1"} <= set(ds.list_indexes())
    created = []
    monkeypatch.setattr(fo.Dataset, "create_index", lambda self, spec, **kw: created.append(spec))
    rv.ensure_review_schema(ds, "nola")
    rv.flag_samples(ds, "nola", threshold=0.5)
    assert created == []


def _examined(plan) -> int:
    """Index keys plus documents an explained query read, summed over its stages."""
    if isinstance(plan, dict):
        own = sum(v for k, v in plan.items() if k in ("totalKeysExamined", "totalDocsExamined"))
        return own + sum(_examined(v) for k, v in plan.items() if k not in ("totalKeysExamined", "totalDocsExamined"))
    if isinstance(plan, list):
        return sum(_examined(v) for v in plan)
    return 0


def test_a_decision_reads_what_it_decides_not_the_queue(synthetic, monkeypatch):
    """Counting the queue after each decision read every key of the tags index it spans (221,000
    at 10^6 samples, 0.11 s of a 0.13 s decision); a decision now reads the decided sample."""
    from pymongo.collection import Collection

    from fiftyone_nola.stages import review as rv

    ds = synthetic(2000, seed=6)
    rv.flag_samples(ds, "nola", threshold=0.5)
    assert rv.queue_length(ds) > 300
    pipelines = []
    original = Collection.aggregate

    def recorded(self, pipeline, *args, **kwargs):
        pipelines.append((self, list(pipeline)))
        return original(self, pipeline, *args, **kwargs)

    sid = rv.next_in_queue(ds)
    monkeypatch.setattr(Collection, "aggregate", recorded)
    r = rv.decide(ds, [sid], "accept")
    monkeypatch.setattr(Collection, "aggregate", original)
    assert r["left_queue"] == 1
    read = {
        str(p): _examined(
            coll.database.command(
                "explain", {"aggregate": coll.name, "pipeline": p, "cursor": {}}, verbosity="executionStats"
            )
        )
        for coll, p in pipelines
    }
    assert read and max(read.values()) <= 20, read


def test_propagation_suggests_never_accepts(review_ds):
    import fiftyone as fo

    from fiftyone_nola.stages import review as rv

    ds = review_ds
    ids = ds.values("id")
    # samples 0 and 1 are near-duplicates; 0 is 'cat' corrected to 'dog'; 1 is predicted 'dog' -> no
    # same-wrong-label neighbour. Make 1 'cat' too, so it carries the same wrong label.
    s1 = ds[ids[1]]
    s1.nola = fo.Classification(label="cat", confidence=0.1)
    s1.save()
    rv.decide(ds, [ids[0]], "correct", "dog")
    preview = rv.propagate_corrections(ds, "nola", 0.9, apply=False)
    assert preview["suggested"] == 1 and not ds.has_sample_field(rv.SUGGESTED_FIELD)
    seen = []
    r = rv.propagate_corrections(ds, "nola", 0.9, progress=lambda d, t, m: seen.append((d, t)))
    assert r["ids"] == [ids[1]] and r["by_label"] == {"dog": 1} and seen[-1] == (1, 1)
    s1 = ds[ids[1]]
    assert s1.nola_suggested.label == "dog" and rv.SUGGESTED_TAG in s1.tags and rv.REVIEW_TAG in s1.tags
    assert rv.ACCEPTED_TAG not in s1.tags and s1.nola_reviewed is None  # a suggestion, not a decision
    assert rv.propagate_corrections(ds, "nola", 0.999999, apply=False)["suggested"] == 0
    # done once: the panel's "suggest to N" no longer counts the neighbour that carries it
    assert rv.propagate_corrections(ds, "nola", 0.9, apply=False)["suggested"] == 0
    card = rv.sample_card(ds, ids[1])
    assert card["suggestion"] == "dog" and card["neighbours"][0]["id"] == ids[0]
    rv.decide(ds, [ids[1]], "correct", "dog")
    assert rv.SUGGESTED_TAG not in ds[ids[1]].tags


def test_corrections_made_before_their_own_tag_are_found(review_ds):
    """A dataset reviewed by 0.2 tagged corrections ``nola:accepted``: its first review write gives
    them the correction tag, and propagation finds them."""
    import fiftyone as fo

    from fiftyone_nola.stages import review as rv

    ds = review_ds
    ids = ds.values("id")
    ds.select(ids[:2]).tag_samples("nola:accepted")
    ds.set_values("nola_reviewed", {ids[0]: fo.Classification(label="dog", confidence=1.0)}, key_field="id")
    rv.flag_samples(ds, "nola", threshold=0.5)
    assert ds[ids[0]].tags.count(rv.CORRECTED_TAG) == 1 and rv.ACCEPTED_TAG not in ds[ids[0]].tags
    assert rv.ACCEPTED_TAG in ds[ids[1]].tags  # a plain accept stays one
    assert rv.propagate_corrections(ds, "nola", 0.0, apply=False)["corrections"] == 1


def test_accept_above_accepts_only_the_undecided_confident(review_ds):
    from fiftyone_nola.stages import review as rv

    ds = review_ds
    ids = ds.values("id")
    rv.decide(ds, [ids[15]], "reject")  # confidence 0.95, but a person said no
    n = rv.accept_above(ds, "nola", 0.8)
    assert n == 3 and rv.REJECTED_TAG in ds[ids[15]].tags
    assert sorted(ds.match_tags(rv.ACCEPTED_TAG).values("nola.confidence")) == [0.8, 0.85, 0.9]


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


def test_a_tsne_map_of_vectors_with_fewer_than_50_dims(make_dataset, tmp_path, capfd):
    """t-SNE's PCA to 50 dims failed on 32-dim vectors (found by prepare_for_review on 60 samples
    of a tiny model: 'n_components=50 must be between 1 and ... 32'). The map prints nothing of
    its own (its per-iteration log was 56 of the demo's 177 lines, issue 25)."""
    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.core.storage import index_dir
    from fiftyone_nola.stages import runs
    from fiftyone_nola.stages.brain_runs import register_brain_runs

    ds = make_dataset(tiny_images(tmp_path / "images", 60))
    path = index_dir(str(ds._doc.id), "test-clip")
    ix = EmbeddingIndex.create(path, 32, {"dataset_id": str(ds._doc.id)})
    ix.add(ds.values("id"), np.random.default_rng(0).normal(size=(60, 32)).astype(np.float32))
    ix.save()
    runs.record_run(ds, "nola_embeddings_clip", "embeddings.clip", {"spec": None}, {"index_path": str(path)})
    with patch("fiftyone_nola.stages.brain_runs.visualization_method", return_value="tsne"):
        r = register_brain_runs(ds, "clip")
    assert r["method"] == "tsne" and ds.load_brain_results(r["visualization"]).points.shape == (60, 2)
    out = capfd.readouterr()
    assert "[t-SNE]" not in out.out + out.err


# ---------------------------------------------------------------------------- export


def test_export_writes_final_labels_and_leaves_the_dataset_untouched(review_ds, tmp_path):
    from fiftyone_nola.core.errors import InvalidInputError
    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages.export import export_accepted

    ds = review_ds
    ids = ds.values("id")
    with pytest.raises(InvalidInputError, match="Nothing to export"):
        export_accepted(ds, str(tmp_path / "none"), "nola")
    rv.decide(ds, ids[:2], "correct", "dog")  # two corrections (sample 1 is predicted dog: an accept)
    rv.decide(ds, [ids[4]], "reject")  # confidence 0.25
    schema = set(ds.get_field_schema())
    modified = dict(zip(*ds.values(["id", "last_modified_at"])))
    rep = export_accepted(ds, str(tmp_path / "out"), "nola", min_confidence=0.65)
    # accepted/corrected: samples 0, 1; above 0.65 and undecided: 0.7 ... 0.95 (6 samples)
    assert rep["exported"] == 8 and rep["left_out"]["rejected"] == 1
    assert rep["left_out"]["below confidence"] == 7 and rep["corrections_used"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == CLASSES
    assert len(list((tmp_path / "out" / "dog").glob("*.png"))) == 3  # 0 (corrected), 1 (accepted), 13 (0.85)
    assert set(ds.get_field_schema()) == schema  # no temporary field
    assert dict(zip(*ds.values(["id", "last_modified_at"]))) == modified  # nothing written
    with pytest.raises(InvalidInputError, match="not empty"):
        export_accepted(ds, str(tmp_path / "out"), "nola", min_confidence=0.5)
    rep = export_accepted(ds, str(tmp_path / "csv"), "nola", format="csv")
    rows = (tmp_path / "csv" / "labels.csv").read_text().splitlines()
    assert rep["exported"] == 2 and rows[0] == "filepath,labels" and all(r.endswith(",dog") for r in rows[1:])
    with pytest.raises(InvalidInputError, match="format"):
        export_accepted(ds, str(tmp_path / "b"), "nola", format="xml")


def test_export_never_writes_outside_the_directory(review_ds, tmp_path):
    from fiftyone_nola.stages import review as rv
    from fiftyone_nola.stages.export import export_accepted, safe_folder_name

    ds = review_ds
    assert safe_folder_name("../evil") == ".._evil" and safe_folder_name("..") == "_.._"
    ds.default_classes = [*CLASSES, "../../escape"]
    ds.save()
    rv.decide(ds, ds.values("id")[:2], "correct", "../../escape")
    out = tmp_path / "deep" / "out"
    rep = export_accepted(ds, str(out), "nola")
    assert rep["exported"] == 2 and rep["renamed_labels"] == {"../../escape": ".._.._escape"}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts]
    assert written and all(out in p.parents for p in written)


def test_calibration_curve_hand_values():
    from fiftyone_nola.stages.evaluation import reliability_curve

    conf = np.array([0.05, 0.15, 0.95, 0.92, np.nan])
    correct = np.array([0, 1, 1, 0, 1])
    c = reliability_curve(conf, correct, bins=10)
    assert c["count"][0] == 1 and c["count"][1] == 1 and c["count"][9] == 2
    assert c["accuracy"][9] == 0.5 and np.isclose(c["mean_confidence"][9], 0.935)
    expected = (1 * 0.05 + 1 * abs(0.15 - 1) + 2 * abs(0.935 - 0.5)) / 4
    assert np.isclose(c["ece"], expected)


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
    from fiftyone_nola.stages.evaluation import calibration

    with pytest.raises(Exception, match="predictions field itself"):
        calibration(review_ds, "nola", "nola")


def test_review_table_is_rounded_and_shows_ece_with_ground_truth(review_ds):
    import fiftyone as fo

    ds = review_ds
    ds.set_values("ground_truth", [fo.Classification(label=CLASSES[i % 2]) for i in range(len(ds))])
    r = run("review_low_confidence", ds, field="nola", threshold=0.5, gt_field="ground_truth")
    assert r.error is None, r.error
    assert "ECE" in r.result["summary"] and r.result["result"]["ece"] == round(r.result["result"]["ece"], 3)
    assert all(len(str(row["mean_confidence"]).split(".")[-1]) <= 3 for row in r.result["result"]["table"])


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


def test_export_form_defaults_and_empty_export_message(review_ds, tmp_path):
    props = form("export_accepted", review_ds)
    assert props["export_dir"].default and "exports" in props["export_dir"].default
    assert props["view_target"].default == "DATASET"
    # nothing accepted: the form says so, and execution answers with a message, not a traceback
    assert props["nola_problems"].error_message.startswith("Nothing to export")
    from fiftyone_nola.stages.review import decide

    ids = review_ds.values("id")
    decide(review_ds, ids[:3], "accept")
    # a leftover selection does not narrow the export
    r = run("export_accepted", review_ds, selected=ids[:1], label_field="nola", export_dir=str(tmp_path / "out"))
    assert r.error is None and r.result["result"]["exported"] == 3


def test_evaluation_keys_never_silently_overwrite_and_final_labels(review_ds):
    import fiftyone as fo

    from fiftyone_nola.stages.review import decide

    ds = review_ds
    ds.set_values("ground_truth", [fo.Classification(label=CLASSES[i % 4]) for i in range(len(ds))])
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth")
    assert r.error is None and r.result["result"]["eval_key"] == "eval_nola"
    assert r.result["result"]["accuracy"] == 1.0
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth", overwrite=False)
    assert r.error is not None and "already exists" in str(r.error)
    # a reviewer fixes one label the wrong way round: the final-label evaluation sees it
    first = ds.first()
    decide(ds, [first.id], "correct", "ship" if first.nola.label != "ship" else "cat")
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth", final_labels=True)
    assert r.error is None and r.result["result"]["eval_key"] == "eval_nola_final"
    assert r.result["result"]["accuracy"] == round(15 / 16, 3)
    assert set(ds.list_evaluations()) == {"eval_nola", "eval_nola_final"}
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth", overwrite=True)
    assert r.error is None


def test_evaluate_form_opens_ready_to_run_when_its_key_is_taken(review_ds):
    """The form's default key is the first free one: with eval_nola taken it opens on eval_nola_2,
    not in an error state with Execute disabled."""
    import fiftyone as fo

    ds = review_ds
    ds.set_values("ground_truth", [fo.Classification(label=CLASSES[i % 4]) for i in range(len(ds))])
    assert run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth").error is None
    props = form("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth")
    assert props["eval_key"].default == "eval_nola_2"
    assert "nola_problems" not in props or not props["nola_problems"].error_message
    r = run("evaluate_labels", ds, pred_field="nola", gt_field="ground_truth", eval_key="eval_nola_2")
    assert r.error is None and sorted(ds.list_evaluations()) == ["eval_nola", "eval_nola_2"]


def test_multilabel_export_by_the_least_confident_label(make_dataset, tmp_path):
    import fiftyone as fo

    from fiftyone_nola.stages.export import export_accepted

    ds = make_dataset([f"/synthetic/m{i}.jpg" for i in range(4)])
    rows = [[("a", 0.9), ("b", 0.8)], [("a", 0.9), ("b", 0.3)], [], [("c", None)]]
    ds.set_values(
        "cdul",
        [
            fo.Classifications(classifications=[fo.Classification(label=lab, confidence=c) for lab, c in r])
            for r in rows
        ],
    )
    rep = export_accepted(ds, str(tmp_path / "ml"), "cdul", format="csv", min_confidence=0.5)
    assert rep["exported"] == 1 and rep["left_out"]["below confidence"] == 3
    assert (tmp_path / "ml" / "labels.csv").read_text().splitlines()[1].endswith(",a;b")


def test_a_correction_may_name_a_class_no_sample_was_predicted_as(make_dataset):
    """A stage called on its own (no pipeline, so no ``default_classes``): the reviewer may still
    correct to any class the field was predicted over. Found by notebook 03, whose random model
    predicted one class: correcting to the folder's class was refused."""
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages import review as rv

    ds = make_dataset([f"/tmp/nola-missing-{i}.jpg" for i in range(3)])
    probs = np.array([[0.9, 0.05, 0.05]] * 3, dtype=np.float32)  # everything predicted as "cat"
    fo_io.write_classifications(ds, ds.values("id"), ["cat", "dog", "frog"], probs, "nola")
    assert ds.distinct("nola.label") == ["cat"] and not ds.default_classes
    assert rv.class_list(ds, "nola") == ["cat", "dog", "frog"]
    rv.decide(ds, ds.values("id")[:1], "correct", label="frog", field="nola")
    assert ds.count_values("nola_reviewed.label").get("frog") == 1
