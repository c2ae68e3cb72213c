"""One whole job per dataset at a time: a second one waits for the first, then reuses its work.

``auto_label`` and ``auto_label_multilabel`` plan what to run from what is stored, then run it.
Two of them on one dataset (a double click on *Run*, a retried schedule, a delegated run and a
CLI job) would both plan from the same empty state; inside :func:`dataset_job` the second plans
only after the first finished, so it finds everything written and redoes nothing. The stores'
and stages' own locks wait the same way, for jobs that write one store or stage only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from fiftyone_nola.core import jobs, storage
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.review import reload_dataset

logger = logging.getLogger(__name__)

JOB_LOCK = "job.lock"


def _dataset_id(samples_or_dataset_id) -> str:
    return samples_or_dataset_id if isinstance(samples_or_dataset_id, str) else fo_io.dataset_id(samples_or_dataset_id)


def job_lock_path(samples_or_dataset_id) -> Path:
    """The lock of whole jobs on this dataset (its holder's facts beside it)."""
    return storage.dataset_dir(_dataset_id(samples_or_dataset_id)) / JOB_LOCK


@contextlib.contextmanager
def dataset_job(
    samples_or_dataset_id, what: str, wait_s: Optional[float] = None, progress: Optional[ProgressFn] = None
) -> Iterator[None]:
    """Run ``what`` (e.g. "auto-label") as the one whole job on this dataset; re-entrant.

    If another job holds the dataset, say once what this one waits for (an INFO line, and
    ``progress`` so an App operator shows it), wait up to ``wait_s`` (None: ``NOLA_JOB_WAIT_S``,
    default 30 min; 0: fail at once), then raise :class:`~fiftyone_nola.core.errors.JobBusyError`.
    A killed holder is taken over at once.
    """
    progress = progress or null_progress
    lock = job_lock_path(samples_or_dataset_id)
    outer = not storage.holds_lock(lock)

    def say(msg: str) -> None:
        logger.info(f"[{what}] {msg}")
        progress(0, 0, msg)

    with jobs.exclusive(lock, what, wait_s, say=say, where=" on this dataset", subject="This dataset"):
        if outer and not isinstance(samples_or_dataset_id, str):
            # This process may have loaded the dataset before another job recorded its stages
            # (or while it waited for it): plan from the database's state, not from that copy.
            reload_dataset(samples_or_dataset_id)
        yield


def running_job(samples) -> Optional[str]:
    """The job running on this dataset, described (what, pid, since when), if another one is:
    a whole job, or one writing a store or a stage. None otherwise, or for a collection that is
    not in the database yet."""
    if samples is None:
        return None
    root = storage.dataset_dir(fo_io.dataset_id(samples))
    if not root.is_dir():
        return None
    locks = [root / JOB_LOCK, *sorted(root.glob("indexes/*/.lock")), *sorted(root.glob("models/*/.lock"))]
    for lock in locks:
        who = jobs.running(lock)
        if who is not None:
            return who
    return None
