import pytest

from fiftyone_nola.core.classes import labels_to_indices, parse_class_text, resolve_classes
from fiftyone_nola.core.errors import InvalidInputError


def test_parse_forms(tmp_path):
    assert resolve_classes("cat, dog ,bird") == ["cat", "dog", "bird"]
    assert resolve_classes(["cat", "dog"]) == ["cat", "dog"]
    f = tmp_path / "classes.txt"
    f.write_text('# my classes\ncat\nsea lion\nR&D/"quoted"\nçà\n')
    assert resolve_classes(str(f)) == ["cat", "sea lion", 'R&D/"quoted"', "çà"]
    assert parse_class_text("a\n\n b \n") == ["a", "b"]


@pytest.mark.parametrize(
    "bad, msg",
    [
        (["cat", "Cat"], "Duplicate"),
        (["cat", " "], "empty"),
        (["cat"], "at least 2"),
        ([], "No class names given"),
        (["sea_lion", "Sea Lion"], "Duplicate"),
    ],
)
def test_bad_class_lists(bad, msg):
    with pytest.raises(InvalidInputError, match=msg):
        resolve_classes(bad)


def test_default_classes_from_dataset(make_dataset):
    ds = make_dataset()
    with pytest.raises(InvalidInputError, match="default_classes"):
        resolve_classes(None, ds)
    ds.default_classes = ["a", "b"]
    assert resolve_classes(None, ds) == ["a", "b"]


def test_labels_to_indices():
    idx, unknown = labels_to_indices(["b", None, "z", "a"], ["a", "b"])
    assert idx == [1, -1, -1, 0] and unknown == ["z"]
