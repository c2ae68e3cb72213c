"""The images `make demo` labels: prints their folder (one sub-folder per class), first found of

1. the folder given as argument (``make demo DEMO_IMAGES=/path/to/class/folders``);
2. ``cifar10_2k`` of ``../shared/data`` beside the repository (or of ``$NOLA_SHARED_DATA``);
3. a CIFAR-10 sample in ``$NOLA_HOME/demo-data/cifar10_300``: the first 30 test images of each
   class, fetched once with torchvision (a 170 MB download, deleted once the sample is written).

When none can be had (no network), prints one line saying what to set and exits 2; the Makefile
shows that line as its error. Progress goes to stderr: stdout is the answer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "cifar10_300"
PER_CLASS = 30
SET = "set DEMO_IMAGES=/path/to/class/folders (one sub-folder of images per class)"
HELP = f"No images for the demo: {SET}, or put ../shared/data beside the repository"


def shared_images() -> Path | None:
    """``cifar10_2k`` of ``$NOLA_SHARED_DATA`` (else ``../shared/data``), if it is there."""
    env = os.environ.get("NOLA_SHARED_DATA")
    if env == "":
        return None
    folder = Path(env or REPO.parent / "shared" / "data") / "cifar10_2k"
    return folder if folder.is_dir() else None


def sample_dir() -> Path:
    home = Path(os.environ.get("NOLA_HOME", Path.home() / ".fiftyone_nola")).expanduser()
    return home / "demo-data" / SAMPLE


def download(root: Path):
    """CIFAR-10's test split through torchvision (downloads and checks the archive, saying so)."""
    from torchvision.datasets import CIFAR10

    with contextlib.redirect_stdout(sys.stderr):  # torchvision prints its progress
        return CIFAR10(str(root), train=False, download=True)


def fetch_sample(dest: Path, per_class: int = PER_CLASS) -> Path:
    """The first ``per_class`` test images of each class as ``dest/<class>/0000.jpg``..., written
    to a side folder and renamed at the end, so a broken fetch leaves no half sample behind."""
    raw, part = dest.parent / "download", dest.with_name(dest.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    try:
        data = download(raw)
        counts = dict.fromkeys(data.classes, 0)
        for image, y in data:
            cls = data.classes[y]
            if counts[cls] < per_class:
                (part / cls).mkdir(parents=True, exist_ok=True)
                image.save(part / cls / f"{counts[cls]:04d}.jpg", quality=95)
                counts[cls] += 1
            if min(counts.values()) >= per_class:
                break
        part.rename(dest)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return dest


def find_images(given: str = "") -> tuple[Path | None, str]:
    """``(folder, "")`` or ``(None, the line saying what to set)``."""
    if given:
        folder = Path(given).expanduser()
        return (folder, "") if folder.is_dir() else (None, f"DEMO_IMAGES={given} is not a folder: {SET}")
    folder = shared_images()
    if folder is not None:
        return folder, ""
    dest = sample_dir()
    if dest.is_dir():
        return dest, ""
    try:
        return fetch_sample(dest), ""
    except (OSError, RuntimeError, tarfile.TarError) as e:  # no network, a refused or broken download
        reason = " ".join(str(e).split()) or type(e).__name__
        return None, f"{HELP} (fetching a CIFAR-10 sample failed: {reason})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder, message = find_images(argv[0] if argv else "")
    print(folder if folder is not None else message)
    return 0 if folder is not None else 2


if __name__ == "__main__":
    sys.exit(main())
