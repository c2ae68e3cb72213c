"""`make demo` on a clone that stands alone: where its images come from, and the one line it
prints when it has none (no ../shared, no DEMO_IMAGES, no network)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import urllib.error

import pytest
from PIL import Image

from conftest import REPO

spec = importlib.util.spec_from_file_location("demo_data", REPO / "scripts" / "demo_data.py")
demo_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_data)


class FakeCifar:
    """What torchvision's CIFAR10 gives: ``classes`` and ``(PIL image, class index)`` pairs."""

    classes = ["airplane", "automobile", "bird"]

    def __iter__(self):
        for i in range(30):
            yield Image.new("RGB", (32, 32), (i * 8, 0, 0)), i % 3


@pytest.fixture
def lone(tmp_path, monkeypatch):
    """A repository with nothing beside it and an empty NOLA_HOME."""
    monkeypatch.setattr(demo_data, "REPO", tmp_path / "repo")
    monkeypatch.delenv("NOLA_SHARED_DATA", raising=False)
    monkeypatch.setenv("NOLA_HOME", str(tmp_path / "home"))
    return tmp_path


def test_offline_prints_one_line_saying_what_to_set_and_exits_2(lone, monkeypatch, capsys):
    def offline(root):
        root.mkdir(parents=True)  # as torchvision does before it downloads
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(demo_data, "download", offline)
    assert demo_data.main([]) == 2
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and err == ""
    assert out.startswith("No images for the demo: set DEMO_IMAGES=/path/to/class/folders")
    assert "../shared/data" in out and "Name or service not known" in out
    assert list((lone / "home" / "demo-data").iterdir()) == []  # nothing half-written is kept


def test_images_come_from_the_argument_then_shared_then_a_cached_sample(lone, monkeypatch, capsys):
    fetched = []

    def fake_download(root):
        fetched.append(root)
        return FakeCifar()

    monkeypatch.setattr(demo_data, "download", fake_download)
    sample = lone / "home" / "demo-data" / demo_data.SAMPLE
    assert demo_data.find_images() == (sample, "")
    assert sorted(p.name for p in sample.iterdir()) == FakeCifar.classes
    assert all(len(list((sample / c).glob("*.jpg"))) == 10 for c in FakeCifar.classes)  # all there were
    assert demo_data.find_images() == (sample, "") and len(fetched) == 1  # fetched once
    shared = lone / "shared" / "data" / "cifar10_2k"
    shared.mkdir(parents=True)
    assert demo_data.find_images() == (shared, "")  # ../shared first when it is there
    monkeypatch.setenv("NOLA_SHARED_DATA", "")
    assert demo_data.find_images() == (sample, "")
    assert demo_data.find_images(str(lone)) == (lone, "")  # DEMO_IMAGES before all
    assert demo_data.main([str(lone / "nope")]) == 2
    assert "is not a folder: set DEMO_IMAGES=" in capsys.readouterr().out


@pytest.fixture
def lone_make(tmp_path):
    """The Makefile and the script in a folder with no ../shared; make's PY is this interpreter."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", repo)
    shutil.copy(REPO / "scripts" / "demo_data.py", repo / "scripts")
    env = {k: v for k, v in os.environ.items() if k not in ("NOLA_SHARED_DATA", "DEMO_IMAGES", "MAKEFLAGS")}
    env["NOLA_HOME"] = str(tmp_path / "home")

    def make(*args):
        cmd = ["make", "--no-print-directory", "-o", "setup", "demo", f"PY={sys.executable}", *args]
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)

    return repo, make


def test_make_demo_uses_the_script(lone_make):
    """The Makefile shows the script's line as its one error line (exit 2, nothing run) and passes
    its folder on. No download is attempted here (the offline line: the tests above)."""
    repo, make = lone_make
    r = make(f"DEMO_IMAGES={repo}/nope")
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    assert f"DEMO_IMAGES={repo}/nope is not a folder: set DEMO_IMAGES=/path/to/class/folders" in lines[0]
    assert "fiftyone_nola" not in lines[0]

    shared = repo.parent / "shared" / "data" / "cifar10_2k"
    shared.mkdir(parents=True)
    (shared / "descriptions.json").write_text("{}")
    r = make("-n")  # ../shared is the fast path, with its descriptions
    assert r.returncode == 0, r.stderr
    assert f"auto-label --images {shared} " in r.stdout and f"--descriptions {shared}/descriptions.json" in r.stdout

    r = make("-n", f"DEMO_IMAGES={repo}")
    assert r.returncode == 0 and f"auto-label --images {repo} " in r.stdout and "--descriptions" not in r.stdout
