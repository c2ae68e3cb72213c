"""Bulk field writes: chunked, complete, None for rows without a finite score."""

import numpy as np
import pytest

from conftest import cifar_files
from fiftyone_nola.stages import fo_io


@pytest.mark.integration
def test_chunked_writes_land_every_label(make_dataset, monkeypatch):
    monkeypatch.setattr(fo_io, "WRITE_CHUNK", 3)  # 10 samples -> 4 set_values calls
    calls = []
    ds = make_dataset([p for p, _ in cifar_files(per_class=1)])
    real = type(ds).set_values
    monkeypatch.setattr(type(ds), "set_values", lambda self, f, v, **kw: calls.append(len(v)) or real(self, f, v, **kw))
    ids = ds.values("id")
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=len(ids)).astype(np.float32)
    probs[5] = np.nan
    classes = ["a", "b", "c", "d"]
    assert fo_io.write_classifications(ds, ids, classes, probs, "pred") == len(ids) - 1
    assert calls == [3, 3, 3, 1]
    got = dict(zip(ds.values("id"), ds.values("pred")))
    for j, sid in enumerate(ids):
        if j == 5:
            assert got[sid] is None
        else:
            assert got[sid].label == classes[int(np.argmax(probs[j]))]
            assert abs(got[sid].confidence - float(probs[j].max())) < 1e-6

    pos = probs > 0.2
    assert fo_io.write_multilabel(ds, ids, classes, probs, pos, "multi") == len(ids) - 1
    got = dict(zip(ds.values("id"), ds.values("multi")))
    for j, sid in enumerate(ids):
        if j != 5:
            labs = [c.label for c in got[sid].classifications]
            assert labs == [classes[i] for i in np.argsort(-probs[j]) if pos[j, i]]
