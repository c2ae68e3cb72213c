"""What a job runs on (a collection or a folder not imported yet), and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fiftyone_nola.core.errors import InvalidInputError, NolaError
from fiftyone_nola.core.files import list_images, spread_over_folders
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.validation.checks import _sample_positions, check_gt_field, check_images, check_range
from fiftyone_nola.stages.validation.report import _problem


@dataclass
class Target:
    """What a job runs on: an existing collection, or a folder of images not imported yet.

    The CLI validates a folder *before* importing it, so that a failed check creates no dataset.
    """

    samples: Any = None
    images_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    gt_from_subfolders: Optional[str] = None
    max_samples: Optional[int] = None
    _files: Optional[list] = field(default=None, repr=False)

    @property
    def input_name(self) -> str:
        return "images" if self.images_dir else ("dataset" if self.dataset_name else "samples")

    def files(self) -> list:
        """Image files of the folder (after ``max_samples``), listed once."""
        if self._files is None:
            files = list_images(self.images_dir)
            if self.max_samples:
                files = spread_over_folders(files, self.max_samples)
            self._files = files
        return self._files


def resolve_target(target: Target) -> tuple[Target, list]:
    """Load an existing dataset by name (read-only); check the folder / collection is usable."""

    problems: list = []
    if target.images_dir:
        try:
            files = target.files()
        except InvalidInputError as e:
            return target, [_problem("images", str(e), "give a folder that holds images")]
        problems += check_images(files, "images")
        name = target.dataset_name or Path(target.images_dir).expanduser().resolve().name
        if target.samples is None:
            import fiftyone as fo

            fo_io.connect_database()
            try:
                names = fo.list_datasets()
            except Exception as e:  # the database itself is another error, said by fo_io
                raise fo_io.DatabaseUnavailableError(fo_io._db_hint(e)) from e
            if name in names:
                target.samples = fo.load_dataset(name)
        if target.max_samples is not None:
            problems += check_range("max_samples", target.max_samples, lo=1, integer=True)
        return target, problems
    if target.samples is None and target.dataset_name:
        try:
            target.samples = fo_io.get_dataset(target.dataset_name)
        except NolaError as e:
            return target, [_problem("dataset", str(e))]
    if target.samples is None:
        return target, [_problem("images", "no images given", "give --images DIR or --dataset NAME")]
    n = len(target.samples)
    if n == 0:
        return target, [
            _problem(
                target.input_name,
                "the dataset or view holds no samples",
                "add images, or clear the view's filters / selection",
            )
        ]
    positions = _sample_positions(n, 8)
    paths = target.samples.values("filepath")
    problems += check_images([paths[i] for i in positions], target.input_name)
    return target, problems


def target_count(target: Target) -> int:
    """How many samples the job will act on (for a folder: existing plus new files)."""
    if target.images_dir:
        files = target.files()
        if target.samples is not None:
            have = set(target.samples.values("filepath"))
            return len(target.samples) + sum(1 for f in files if f not in have)
        return len(files)
    return len(target.samples) if target.samples is not None else 0


def _subfolder_labels(target: Target) -> set:
    return {Path(f).parent.name for f in target.files()}


def _check_target_gt(target: Target, gt: Optional[str], classes, outputs: list, multilabel: bool) -> list:
    """The ground-truth field of a collection, or of a folder about to be imported."""
    samples = target.samples
    if gt and target.images_dir and target.gt_from_subfolders == gt:
        labels = _subfolder_labels(target) if samples is None or gt not in samples.get_field_schema() else None
        return check_gt_field(samples, gt, classes, multilabel, outputs, labels=labels)
    if gt and samples is None and target.images_dir:
        return [
            _problem(
                "gt_field",
                f"field {gt!r} does not exist: the dataset is created from the folder and holds no ground truth",
                "use --gt-from-subfolders FIELD to store each image's folder name as ground truth, "
                "or leave it out (no evaluation)",
            )
        ]
    return check_gt_field(samples, gt, classes, multilabel, outputs)
