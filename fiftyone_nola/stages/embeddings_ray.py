"""Distributed embedding on a Ray cluster: the same stores and vectors as ``compute_embeddings``.

The driver plans like the local engine (same store, lock, fingerprints and to-do list); a Ray
Data pipeline decodes and embeds the to-do images on a pool of actors (one model load per
actor, one GPU each when the cluster has GPUs) with the very code of the local engine
(``embed.iter_embeddings``); the driver writes what comes back as ``.npz`` shards, then streams
the shards into the FAISS store. Shards outlive a crash: a re-run embeds only what they lack.

Ray is imported only when this engine runs: ``pip install 'fiftyone-nola[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fiftyone_nola.core import engines, storage
from fiftyone_nola.core.device import hardware_profile, resolve_device
from fiftyone_nola.core.embed import EmbedConfig, iter_embeddings
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.models import ClipSpec, DinoSpec, load_model
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.stages.embeddings import EmbedJob, _specs

logger = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.npz"
MAX_BATCH = 1024  # images per actor call and per shard: bounds a lost call's cost after a crash
CALLS_PER_ACTOR = 4  # small jobs are split so that every actor gets work


@dataclass
class RayEmbedConfig:
    """Where and how wide the Ray engine runs; None means "fit the cluster"."""

    # None: the Ray session this process already has, else RAY_ADDRESS, else a new local
    # cluster; "auto": the cluster started on this machine with `ray start`; "host:port" or
    # "ray://host:port": a remote cluster (image paths must be readable by its workers).
    address: Optional[str] = None
    num_actors: Optional[int] = None  # None: one per GPU, else one per num_cpus_per_actor CPUs
    num_gpus_per_actor: Optional[float] = None  # None: 1 if the cluster has GPUs, else 0
    num_cpus_per_actor: float = 1.0
    decode_workers: Optional[int] = None  # DataLoader processes per actor; None: CPUs - 1
    batch_size: Optional[int] = None  # images per actor call = per shard; None: fit the job
    shard_dir: Optional[str] = None  # None: <index dir>/shards-ray; else <dir>/<dataset>/<model>
    keep_shards: bool = False  # keep the shards after the store is saved
    runtime_env: Optional[dict] = None  # passed to ray.init, e.g. {"env_vars": {...}}


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pandas/pyarrow)
    except ImportError as e:
        raise InvalidInputError(f"compute_embeddings_ray needs Ray Data ({e}): pip install 'fiftyone-nola[ray]'") from e
    return ray


def compute_embeddings_ray(
    samples,
    family: str = "both",
    clip: Optional[ClipSpec] = None,
    dino: Optional[DinoSpec] = None,
    config: Optional[EmbedConfig] = None,
    ray_config: Optional[RayEmbedConfig] = None,
    overwrite: bool = False,
    progress: ProgressFn = null_progress,
) -> dict:
    """``compute_embeddings`` on a Ray cluster: same stores, run records and summaries.

    Each family's summary also has ``engine="ray"``, ``actors``, ``shards`` (written by this
    run) and ``shards_reused`` (left by an interrupted one). ``config.device`` / ``batch_size``
    apply to the actors (default: CUDA with GPU actors, else CPU).
    """
    specs = _specs(family, clip, dino)
    ray = _import_ray()
    config = config or EmbedConfig()
    rcfg = ray_config or RayEmbedConfig()
    out = {}
    with _connected(ray, rcfg):
        for spec in specs:
            out[spec.family] = _embed_one_ray(ray, samples, spec, config, rcfg, overwrite, progress)
    return out


@contextlib.contextmanager
def _connected(ray, rcfg: RayEmbedConfig) -> Iterator[None]:
    """Use this process's Ray session, or open one for the call (closed afterwards)."""
    if ray.is_initialized():
        if rcfg.address:
            logger.info(f"[embed:ray] already connected to Ray: ignoring address={rcfg.address!r}")
        yield
        return
    ray.init(address=rcfg.address, runtime_env=rcfg.runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def _gpus_per_actor(ray, rcfg: RayEmbedConfig) -> float:
    if rcfg.num_gpus_per_actor is not None:
        return float(rcfg.num_gpus_per_actor)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _actor_config(config: EmbedConfig, rcfg: RayEmbedConfig, gpus: float) -> EmbedConfig:
    """The embedding settings the actors run with (their device, not the driver's)."""
    device = config.device or ("cuda" if gpus > 0 else "cpu")
    workers = rcfg.decode_workers
    if workers is None:
        workers = max(0, int(rcfg.num_cpus_per_actor) - 1)
    batch = config.batch_size or hardware_profile(torch.device(device)).embed_batch_size
    # Actors run PyTorch: the store records one engine for every actor's vectors.
    return replace(config, device=device, num_workers=workers, batch_size=batch, engine="torch")


def _num_actors(ray, rcfg: RayEmbedConfig, gpus: float) -> int:
    if rcfg.num_actors:
        return int(rcfg.num_actors)
    res = ray.cluster_resources()
    if gpus > 0:
        return max(1, int(res.get("GPU", 0) // gpus))
    return max(1, int(res.get("CPU", 1) // max(rcfg.num_cpus_per_actor, 1e-3)))


def _call_size(rcfg: RayEmbedConfig, n: int, actors: int, model_batch: int) -> int:
    """Images per actor call: a multiple of the model batch, so the model sees the same
    batches as on one machine (bit-identical vectors), and >= CALLS_PER_ACTOR calls each."""
    size = rcfg.batch_size or min(MAX_BATCH, math.ceil(n / (actors * CALLS_PER_ACTOR)))
    return max(1, math.ceil(size / model_batch)) * model_batch


class EmbedActor:
    """Ray Data callable class: loads the model once, embeds batches of ``filepath`` rows.

    Returns per row the ``id``, a float32 ``vector`` (NaN if unreadable) and ``error`` ("" if
    fine), decoding and encoding exactly as the local engine does.
    """

    def __init__(self, spec, config: EmbedConfig, model_key: str):
        self.config = config
        self.model = load_model(spec, resolve_device(config.device))
        if self.model.key != model_key:
            raise IndexMismatchError(
                f"A Ray worker loaded model {self.model.key} but the driver expects {model_key}: "
                f"give every node the same weights (NOLA_MODELS_DIR, checkpoint paths)."
            )

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["filepath"]]
        vectors = np.full((len(paths), self.model.embed_dim), np.nan, dtype=np.float32)
        errors = np.full(len(paths), "", dtype=object)
        for idx, vecs, bad in iter_embeddings(self.model, paths, self.config):
            vectors[idx] = vecs
            for j, reason in bad:
                errors[j] = reason
        return {"id": batch["id"], "vector": vectors, "error": errors}


class _Shards:
    """The ``.npz`` shards of one model's store: written atomically, reusable after a crash."""

    def __init__(self, job: EmbedJob, rcfg: RayEmbedConfig):
        if rcfg.shard_dir:
            self.dir = Path(rcfg.shard_dir) / job.meta["dataset_id"] / job.model.key
        else:
            self.dir = job.path / "shards-ray"
        self.tag = {"model_key": job.model.key, "preprocessing": job.meta["preprocessing"]}
        self.run = uuid.uuid4().hex[:8]
        self.written = 0

    def paths(self) -> list[Path]:
        return sorted(self.dir.glob(SHARD_GLOB)) if self.dir.is_dir() else []

    def write(self, ids, vectors: np.ndarray, errors, fingerprints: list[str]) -> Path:
        out = self.dir / f"shard-{self.run}-{self.written:06d}.npz"
        arrays = {
            "ids": np.asarray(ids, dtype=str),
            "vectors": np.asarray(vectors, dtype=np.float32),
            "errors": np.asarray(errors, dtype=str),
            "fingerprints": np.asarray(fingerprints, dtype=str),
            **{k: np.asarray(v, dtype=str) for k, v in self.tag.items()},
        }
        with storage.atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        self.written += 1
        return out

    def rows(self, path: Path, job: EmbedJob, pending: dict[str, int]) -> list[tuple[int, int]]:
        """``(row in shard, position in job)`` of the shard's rows still to do, same file."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if any(str(z[k]) != v for k, v in self.tag.items()):
                    return []
                ids, fps = z["ids"], z["fingerprints"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return []  # not a shard of this version: ignored, deleted with the others
        out = []
        for k, (sid, fp) in enumerate(zip(ids.tolist(), fps.tolist())):
            j = pending.get(sid)
            if j is not None and job.fingerprints[j] == fp:
                out.append((k, j))
        return out

    def clear(self) -> None:
        for p in self.paths():
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _embed_one_ray(ray, samples, spec, config: EmbedConfig, rcfg: RayEmbedConfig, overwrite: bool, progress) -> dict:
    gpus = _gpus_per_actor(ray, rcfg)
    cfg = _actor_config(config, rcfg, gpus)
    # The driver loads the model only for the store's identity (dim, key, input size).
    job = EmbedJob(samples, spec, cfg, torch.device("cpu"))
    shards = _Shards(job, rcfg)
    how = f"on Ray, batch {cfg.batch_size}, device {cfg.device}, {gpus:g} GPU per actor"
    with job.writing(overwrite, how, progress):
        if overwrite:
            shards.clear()
        pending = {job.ids[j]: j for j in job.todo}
        covered = {j for p in shards.paths() for _, j in shards.rows(p, job, pending)}
        missing = [j for j in job.todo if j not in covered]
        actors = 0
        if pending:
            job.use_engine(engines.resolve("torch", cfg.precision, cfg.device))
        if missing:
            actors = _run_pipeline(ray, job, missing, shards, rcfg, gpus, progress)
        reused = _ingest(job, shards, pending)
        job.save()
        if not rcfg.keep_shards:
            shards.clear()  # still locked: a job waiting for the lock may write new shards
    extra = {"engine": "ray", "actors": actors, "shards": shards.written, "shards_reused": reused}
    # runtime_env may carry credentials (env_vars): not for the dataset's run record.
    recorded = {k: v for k, v in asdict(rcfg).items() if k != "runtime_env"}
    return job.finish(run_config={"ray": recorded}, extra=extra)


def _run_pipeline(
    ray, job: EmbedJob, todo: list[int], shards: _Shards, rcfg: RayEmbedConfig, gpus: float, progress
) -> int:
    """Embed the samples at positions ``todo`` on an actor pool; one shard per actor call."""
    import pyarrow as pa

    family = job.spec.family
    actors = _num_actors(ray, rcfg, gpus)
    size = _call_size(rcfg, len(todo), actors, job.cfg.batch_size)
    calls = [todo[i : i + size] for i in range(0, len(todo), size)]
    actors = min(actors, len(calls))
    logger.info(f"[embed:{family}] Ray: {actors} actors, {len(calls)} calls of <= {size} images")
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    # In-order results keep the store's row order the local engine's; one block per call.
    ctx.execution_options.preserve_order = True
    try:
        blocks = [pa.table({"id": [job.ids[j] for j in c], "filepath": [job.paths[j] for j in c]}) for c in calls]
        ds = ray.data.from_arrow(blocks).map_batches(
            EmbedActor,
            fn_constructor_kwargs={"spec": job.spec, "config": job.cfg, "model_key": job.model.key},
            batch_size=size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=rcfg.num_cpus_per_actor,
            num_gpus=gpus,
        )
        position = {job.ids[j]: j for j in todo}
        done = 0
        progress(0, len(todo), f"embedding ({family}) on Ray")
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            # Vectors travel to the driver anyway (it builds the store), so it writes the
            # shards: the workers need no access to the store's disk.
            fps = [job.fingerprints[position[str(s)]] for s in out["id"]]
            shards.write(out["id"], out["vector"], out["error"], fps)
            done += len(out["id"])
            progress(done, len(todo), f"embedding ({family}) on Ray")
    finally:
        ctx.execution_options.preserve_order = saved
    return actors


def _ingest(job: EmbedJob, shards: _Shards, pending: dict[str, int]) -> int:
    """Stream the shards into the store in sample order; returns how many an earlier run left."""
    plan = []
    for p in shards.paths():
        rows = shards.rows(p, job, pending)
        if rows:
            plan.append((min(j for _, j in rows), p, rows))
    done: set[int] = set()
    for _, path, rows in sorted(plan, key=lambda t: t[0]):
        rows = [(k, j) for k, j in rows if j not in done]
        done.update(j for _, j in rows)
        with np.load(path, allow_pickle=False) as z:
            vectors, errors = z["vectors"], z["errors"]
        good = [(k, j) for k, j in rows if not errors[k]]
        job.add([j for _, j in good], vectors[[k for k, _ in good]])
        job.fail((j, str(errors[k])) for k, j in rows if errors[k])
    return sum(1 for _, p, _ in plan if not p.name.startswith(f"shard-{shards.run}-"))


__all__ = ["compute_embeddings_ray", "RayEmbedConfig", "EmbedActor"]
