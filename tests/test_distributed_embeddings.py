"""The Ray engine builds the same store as the local engine, on a local 2-node Ray cluster."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import cifar_files
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.models import tiny_clip_spec
from fiftyone_nola.stages import embeddings_ray as distributed
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.embeddings import compute_embeddings, index_path, load_embeddings
from fiftyone_nola.stages.embeddings_ray import RayEmbedConfig, compute_embeddings_ray

CFG = EmbedConfig(batch_size=4, num_workers=0, chunk_size=4)
SAME_META = (
    "format_version",
    "dim",
    "metric",
    "index_type",
    "normalized",
    "model_key",
    "model",
    "preprocessing",
    "dataset_id",
    "count",
    "built_index_type",
)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and a worker node on 127.0.0.1, one CPU (one actor) each."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'fiftyone-nola[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]'")
    from ray.cluster_utils import Cluster

    # A short private temp dir: Ray's socket paths have a length limit; /tmp/ray is shared.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    node = dict(num_cpus=1, object_store_memory=100 * 1024**2, node_ip_address="127.0.0.1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_DISABLE_USAGE_STATS", "1")
        mp.setenv("RAY_TMPDIR", temp)
        # Otherwise ray.init rewrites 127.0.0.1 to this host's LAN address, where the
        # loopback-bound cluster does not listen (the env var reaches processes started later).
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        cluster = Cluster(shutdown_at_exit=True)
        try:
            cluster.add_node(**node, include_dashboard=False)
            cluster.add_node(**node)
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def image_files(tmp_path):
    """Ten real CIFAR images and one corrupt JPEG."""
    files = []
    for i, (p, _) in enumerate(cifar_files(per_class=1)):
        files.append(str(tmp_path / f"{i:02d}.jpg"))
        shutil.copy(p, files[-1])
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return files, str(bad)


def _tagged(ds) -> set:
    return set(ds.match_tags(fo_io.UNREADABLE_TAG).values("filepath"))


@pytest.mark.integration
@pytest.mark.slow
def test_ray_engine_matches_local_engine_and_resumes_from_shards(
    ray_cluster, make_dataset, image_files, tmp_path, monkeypatch
):
    files, bad = image_files
    ds = make_dataset(files + [bad])
    spec = tiny_clip_spec()
    # One dataset, two stores: the engines must agree id for id.
    monkeypatch.setenv("NOLA_HOME", str(tmp_path / "local"))
    local = compute_embeddings(ds, "clip", spec, config=CFG)["clip"]
    assert (local["embedded"], local["failed"]) == (10, 1) and _tagged(ds) == {bad}
    local_ix = EmbeddingIndex.open(index_path(ds, spec))
    ds.untag_samples(fo_io.UNREADABLE_TAG)

    monkeypatch.setenv("NOLA_HOME", str(tmp_path / "ray"))
    rcfg = RayEmbedConfig(address=ray_cluster.address, num_actors=2)
    shard_dir = Path(index_path(ds, spec)) / "shards-ray"
    # Crash after the cluster's work is on disk: the re-run must not need the cluster.
    pools = []
    real_run, real_ingest = distributed._run_pipeline, distributed._ingest

    def run(*a):
        pools.append(real_run(*a))
        return pools[-1]

    def crash(*a):
        raise RuntimeError("driver died")

    monkeypatch.setattr(distributed, "_run_pipeline", run)
    monkeypatch.setattr(distributed, "_ingest", crash)
    with pytest.raises(RuntimeError, match="driver died"):
        compute_embeddings_ray(ds, "clip", spec, config=CFG, ray_config=rcfg)
    assert pools == [2] and len(list(shard_dir.glob("shard-*.npz"))) == 3  # 11 images, calls of 4
    monkeypatch.setattr(distributed, "_ingest", real_ingest)

    out = compute_embeddings_ray(ds, "clip", spec, config=CFG, ray_config=rcfg)["clip"]
    assert (out["engine"], out["actors"], out["shards"], out["shards_reused"]) == ("ray", 0, 0, 3)
    assert (out["embedded"], out["reused"], out["failed"], out["index_size"]) == (10, 0, 1, 10)
    assert _tagged(ds) == {bad} and not list(shard_dir.glob("*.npz"))
    assert ds.get_run_info("nola_embeddings_clip").config.method == "nola.embeddings.clip"

    ray_ix = EmbeddingIndex.open(index_path(ds, spec), expect={"model_key": local["model_key"]})
    assert ray_ix.ids == local_ix.ids
    assert np.allclose(ray_ix.vectors, local_ix.vectors, rtol=0, atol=1e-6)
    assert {k: ray_ix.meta[k] for k in SAME_META} == {k: local_ix.meta[k] for k in SAME_META}
    assert ray_ix.fingerprints == local_ix.fingerprints
    ids, vecs = load_embeddings(ds, spec)
    assert np.isnan(vecs).all(axis=1).sum() == 1 and np.allclose(
        vecs[:10], local_ix.get(ids[:10])[0], rtol=0, atol=1e-6
    )

    # Nothing changed: only the unreadable file is tried again (on one actor), and fails again.
    again = compute_embeddings_ray(ds, "clip", spec, config=CFG, ray_config=rcfg)["clip"]
    assert (again["embedded"], again["reused"], again["failed"], again["actors"]) == (0, 10, 1, 1)


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(InvalidInputError, match=r"pip install 'fiftyone-nola\[ray\]'"):
        compute_embeddings_ray(None, "clip", tiny_clip_spec())


def test_importing_the_library_does_not_import_ray():
    code = "import sys, fiftyone_nola.stages.embeddings_ray; sys.exit('ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


@pytest.mark.integration
@pytest.mark.slow
def test_cli_embed_on_ray(ray_cluster, make_dataset, image_files, tmp_path, monkeypatch, capsys):
    from fiftyone_nola.cli import main

    files, _ = image_files
    ds = make_dataset(files[:4])
    monkeypatch.setenv("NOLA_HOME", str(tmp_path / "cli"))
    code = main(
        [
            "embed",
            "--dataset",
            ds.name,
            "--family",
            "clip",
            "--ray",
            ray_cluster.address,
            "--ray-actors",
            "2",
            "--clip-arch",
            "nola-tiny-clip",
            "--clip-pretrained",
            "",
            "--random-init",
            "--workers",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    ix = EmbeddingIndex.open(index_path(ds, tiny_clip_spec()))
    assert sorted(ix.ids) == sorted(ds.values("id"))
    assert ds.load_run_results("nola_embeddings_clip").summary["engine"] == "ray"
