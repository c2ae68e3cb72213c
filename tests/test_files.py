"""Image files on disk: listing, and --max-samples' subset that keeps every class folder."""

from collections import Counter
from pathlib import Path

from fiftyone_nola.core.files import list_images, spread_over_folders


def _tree(root: Path, sizes: dict) -> list[str]:
    for folder, n in sizes.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i:04d}.jpg").write_bytes(b"x")
    return list_images(str(root))


def test_max_samples_keeps_every_folder_with_counts_as_even_as_possible(tmp_path):
    # sorted, unbalanced: the old rule (every len//n-th file, then cut at n) dropped 'truck' entirely
    sizes = {"airplane": 400, "cat": 90, "dog": 300, "frog": 5, "truck": 205}
    files = _tree(tmp_path, sizes)
    picked = spread_over_folders(files, 300)
    per = Counter(Path(f).parent.name for f in picked)
    assert len(picked) == 300 and set(per) == set(sizes)
    assert per["frog"] == 5  # a small folder gives what it has, the rest share its quota evenly
    assert sorted(per[c] for c in ("airplane", "cat", "dog", "truck")) == [73, 74, 74, 74]
    assert picked == [f for f in files if f in set(picked)]  # input order kept
    dog = sorted(f for f in picked if "/dog/" in f)
    assert Path(dog[0]).name == "0000.jpg" and Path(dog[-1]).name >= "0290.jpg"  # spread, not a prefix


def test_max_samples_edges(tmp_path):
    files = _tree(tmp_path, {"a": 3, "b": 1, "c": 2})
    assert spread_over_folders(files, 10) == files
    assert Counter(Path(f).parent.name for f in spread_over_folders(files, 3)) == {"a": 1, "b": 1, "c": 1}
    two = spread_over_folders(files, 2)  # fewer slots than folders: the largest folders first
    assert Counter(Path(f).parent.name for f in two) == {"a": 1, "c": 1}
