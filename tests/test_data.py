"""Image decoding edge cases with real files written by the tests."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fiftyone_nola.core.data import (
    DecodeOptions,
    ImageFileDataset,
    collate_skip_bad,
    file_fingerprint,
    load_image,
    try_load_image,
)


def _write(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return str(p)


@pytest.fixture
def odd_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    return {
        "gray": _write(tmp_path, "g.png", rgb.convert("L")),
        "rgba": _write(tmp_path, "a.png", rgb.convert("RGBA")),
        "palette": _write(tmp_path, "p.png", rgb.convert("P")),
        "cmyk": _write(tmp_path, "c.jpg", rgb.convert("CMYK")),
        "i16": _write(tmp_path, "i16.png", Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16))),
        "la": _write(tmp_path, "la.png", rgb.convert("LA")),
    }


def test_modes_convert_to_rgb(odd_images):
    for name, p in odd_images.items():
        img = load_image(p)
        assert img.mode == "RGB", name
        assert img.size == (50, 40), name
    # 16-bit data is rescaled, not clipped to white
    arr = np.asarray(load_image(odd_images["i16"]))
    assert arr.min() < 30 and arr.max() > 220


def test_bad_files_are_reported_not_raised(tmp_path):
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    good = _write(tmp_path, "good.jpg", Image.new("RGB", (64, 64), "red"))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(open(good, "rb").read()[:200])
    link = tmp_path / "dangling.jpg"
    os.symlink(tmp_path / "gone.jpg", link)
    for p, reason in [
        (zero, "unreadable"),
        (text, "unreadable"),
        (truncated, "unreadable"),
        (tmp_path / "missing.jpg", "missing"),
        (link, "missing"),
    ]:
        img, err = try_load_image(str(p))
        assert img is None and reason in err, (p, err)
    assert try_load_image(good)[1] is None


def test_decompression_bomb_limit_is_kept(tmp_path, monkeypatch):
    p = _write(tmp_path, "big.png", Image.new("RGB", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    img, err = try_load_image(p)
    assert img is None and "decompression bomb" in err


def test_draft_decoding_downscales_large_jpegs_but_not_below_target(tmp_path):
    p = _write(tmp_path, "big.jpg", Image.new("RGB", (2000, 1600), "blue"), quality=90)
    full = load_image(p)
    draft = load_image(p, DecodeOptions(draft_size=224))
    assert full.size == (2000, 1600)
    assert min(draft.size) >= 224 and draft.size[0] < 2000


def test_dataset_and_collate_skip_bad(tmp_path):
    good = _write(tmp_path, "good.png", Image.new("RGB", (8, 8), "red"))
    bad = str(tmp_path / "missing.png")
    ds = ImageFileDataset([good, bad, good], lambda im: torch.zeros(3, 4, 4))
    idx, batch, failed = collate_skip_bad([ds[i] for i in range(3)])
    assert idx.tolist() == [0, 2] and batch.shape == (2, 3, 4, 4)
    assert failed[0][0] == 1 and "missing" in failed[0][1]
    idx, batch, failed = collate_skip_bad([ds[1]])
    assert batch is None and len(failed) == 1


def test_fingerprint_changes_with_content(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a")
    a = file_fingerprint(str(p))
    p.write_bytes(b"bb")
    assert file_fingerprint(str(p)) != a
    assert file_fingerprint(str(tmp_path / "nope")) == "missing"
