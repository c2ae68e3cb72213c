"""Image files on disk: the images under a folder, and an even subset of them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fiftyone_nola.core.errors import EmptyViewError, InvalidInputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_images(directory: str, recursive: bool = True) -> list[str]:
    """Image files under ``directory``, sorted, absolute."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidInputError(f"Image directory {root} does not exist or is not a directory")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        str(p.resolve())
        for p in root.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
    )
    if not files:
        raise EmptyViewError(f"No image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files


def _quotas(sizes: dict, n: int) -> dict:
    """Files to take per folder: as even as possible, a folder with fewer files giving its share
    to the others (largest folders first when there are more folders than ``n``)."""
    quota = dict.fromkeys(sizes, 0)
    left, open_ = n, sorted(sizes, key=lambda d: (-sizes[d], d))
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for d in list(open_):
            take = min(share, sizes[d] - quota[d], left)
            quota[d] += take
            left -= take
            if quota[d] == sizes[d]:
                open_.remove(d)
            if not left:
                break
    return quota


def spread_over_folders(files: Sequence[str], n: int) -> list[str]:
    """At most ``n`` of ``files``, every folder represented (if ``n`` allows), counts per folder
    as even as possible, inside a folder evenly spread over its sorted files; input order kept."""
    if n >= len(files):
        return list(files)
    folders: dict = {}
    for f in files:
        folders.setdefault(os.path.dirname(f), []).append(f)
    keep = set()
    for d, k in _quotas({d: len(v) for d, v in folders.items()}, n).items():
        names = sorted(folders[d])
        keep.update(names[i * len(names) // k] for i in range(k))
    return [f for f in files if f in keep]
