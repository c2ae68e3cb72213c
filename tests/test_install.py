"""Installing the way FiftyOne users do, for real, into fresh virtual environments.

- ``fiftyone plugins download <archive URL>`` (the repo served from 127.0.0.1) then
  ``fiftyone plugins requirements @fiftyone-nola/nola --install``: every operator registers and runs.
- ``python -m build`` wheel + sdist, ``twine check``, ``pip install`` of the wheel,
  ``fiftyone-nola --help`` and ``fiftyone-nola plugin install``: FiftyOne lists the operators.
- One version: ``fiftyone.yml`` and ``requirements.txt`` agree with ``pyproject.toml``.

The fresh environments see the already-installed dependencies through a ``.pth`` file (a link farm
of this venv's site-packages without fiftyone_nola), so pip finds every requirement satisfied:
offline and cheap, yet ``fiftyone_nola`` comes only from what is being tested.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml

from conftest import REPO

MANIFEST = yaml.safe_load((REPO / "fiftyone.yml").read_text())
PLUGIN = MANIFEST["name"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SITE = Path(sysconfig.get_paths()["purelib"])


def _run(cmd, env=None, timeout=300):
    # Never from the repo: `python -c` puts the working directory first on sys.path.
    out = subprocess.run(
        [str(c) for c in cmd], env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


# --------------------------------------------------------------------------- one version


def test_plugin_manifest_and_requirements_agree_with_pyproject():
    assert MANIFEST["version"] == PYPROJECT["version"]
    fo_dep = next(d for d in PYPROJECT["dependencies"] if d.startswith("fiftyone>"))
    assert MANIFEST["fiftyone"]["version"] == fo_dep.removeprefix("fiftyone")
    reqs = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    faiss = PYPROJECT["optional-dependencies"]["cpu"]
    assert [r for r in reqs if r] == PYPROJECT["dependencies"] + faiss


def test_version_is_the_package_version():
    import fiftyone_nola

    assert fiftyone_nola.__version__ == PYPROJECT["version"]
    assert fiftyone_nola._source_version() == PYPROJECT["version"]


# --------------------------------------------------------------------------- fresh environments


def _source_files() -> list[str]:
    """What a commit of this tree holds (= ``git archive HEAD`` in CI's clean clone)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return [f for f in out if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def deps_dir(tmp_path_factory) -> Path:
    """This venv's site-packages as links, without fiftyone_nola (nor its editable hook)."""
    d = tmp_path_factory.mktemp("deps")
    for p in SITE.iterdir():
        if p.name.lower().startswith(("fiftyone_nola", "__editable__", "fiftyone-nola")) or p.suffix == ".pth":
            continue
        (d / p.name).symlink_to(p)
    return d


def _fresh_venv(path: Path, deps_dir: Path) -> Path:
    """A new venv (no pip of its own: the linked one runs) that sees ``deps_dir``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_nola_test_deps.pth").write_text(f"{deps_dir}\n")
    # the `fiftyone` command of a FiftyOne install, run by this venv's python
    fo = path / "bin" / "fiftyone"
    fo.write_text(f"#!{py}\nimport sys\nfrom fiftyone.core.cli import main\nsys.exit(main())\n")
    fo.chmod(0o755)
    return py


def _env(plugins_dir: Path) -> dict:
    env = dict(os.environ, FIFTYONE_PLUGINS_DIR=str(plugins_dir), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    return env


# Lists what the plugin registered (errors included) and where the library came from; with
# "run", also runs an operator on a new dataset of real image files.
PLUGIN_CHECK = textwrap.dedent("""
    import json, sys, tempfile
    from fiftyone.plugins.context import build_plugin_contexts
    ctx = [c for c in build_plugin_contexts() if c.name == sys.argv[1]]
    import fiftyone_nola  # after the plugin loaded: where did its operators find the library?
    print(json.dumps({"library": fiftyone_nola.__file__, "version": fiftyone_nola.__version__,
                      "plugins": len(ctx), "errors": ctx[0].errors if ctx else None,
                      "registered": sorted(i.name for i in ctx[0].instances) if ctx else []}))
    if sys.argv[2:] == ["run"]:
        import fiftyone as fo
        import fiftyone.operators as foo
        from PIL import Image
        d = tempfile.mkdtemp()
        ds = fo.Dataset()
        for i, (g, p) in enumerate([("a", "a"), ("b", "a"), ("b", "b"), ("a", "a")]):
            Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(f"{d}/{i}.jpg")
            ds.add_sample(fo.Sample(filepath=f"{d}/{i}.jpg", gt=fo.Classification(label=g),
                                    pred=fo.Classification(label=p)))
        res = foo.execute_operator(sys.argv[1] + "/evaluate_labels",
                                   ctx={"dataset": ds, "params": {"pred_field": "pred", "gt_field": "gt"}})
        ds.delete()
        assert res.error is None, res.error
        print("accuracy", res.result["result"]["accuracy"])
""")


def _plugin_check(py: Path, env: dict, *extra: str) -> tuple[dict, str]:
    out = _run([py, "-c", PLUGIN_CHECK, PLUGIN, *extra], env=env)
    return json.loads(next(line for line in out.splitlines() if line.startswith("{"))), out


def _assert_every_operator(report: dict, where: Path) -> None:
    assert report["plugins"] == 1 and not report["errors"], report
    assert report["registered"] == sorted(MANIFEST["operators"] + MANIFEST["panels"])
    assert report["version"] == PYPROJECT["version"]
    assert Path(report["library"]).resolve().is_relative_to(where.resolve()), report["library"]


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory):
    """The repository as a GitHub-style archive (one top folder) on a loopback HTTP server."""
    root = tmp_path_factory.mktemp("served")
    with zipfile.ZipFile(root / "fiftyone-nola-main.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for f in _source_files():
            z.write(REPO / f, f"fiftyone-nola-main/{f}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fiftyone-nola-main.zip"
    server.shutdown()


@pytest.mark.slow
def test_fiftyone_plugins_download_then_requirements_gives_a_working_plugin(served_repo, deps_dir, tmp_path):
    py = _fresh_venv(tmp_path / "venv", deps_dir)
    plugins = tmp_path / "plugins"
    env = _env(plugins)
    fo = py.parent / "fiftyone"
    _run([fo, "plugins", "download", served_repo], env=env)
    plugin_dir = plugins.joinpath(*PLUGIN.split("/"))
    assert (plugin_dir / "fiftyone.yml").is_file() and (plugin_dir / "requirements.txt").is_file()
    out = _run([fo, "plugins", "requirements", PLUGIN, "--install"], env=env, timeout=600)
    assert "error" not in out.lower(), out
    report, out = _plugin_check(py, env, "run")
    _assert_every_operator(report, plugin_dir)  # the library runs from the downloaded plugin itself
    assert "accuracy 0.75" in out, out


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict:
    """sdist and wheel of this tree (the wheel is built from the sdist, as ``python -m build`` does)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src])
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


@pytest.mark.slow
def test_wheel_installs_with_the_cli_and_links_the_plugin(dists, deps_dir, tmp_path):
    out = _run([sys.executable, "-m", "twine", "check", "--strict", dists["wheel"], dists["sdist"]])
    assert out.count("PASSED") == 2, out
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = set(z.namelist())
    assert {
        "fiftyone_nola/_plugin/fiftyone.yml",
        "fiftyone_nola/_plugin/operators/__init__.py",
        "fiftyone_nola/core/configs/templates.json",
    } <= names

    venv = tmp_path / "venv"
    py = _fresh_venv(venv, deps_dir)
    plugins = tmp_path / "plugins"
    env = _env(plugins)
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", dists["wheel"]], env=env)
    assert "plugin" in _run([venv / "bin" / "fiftyone-nola", "--help"], env=env)

    out = _run([venv / "bin" / "fiftyone-nola", "plugin", "install"], env=env)
    target = plugins.joinpath(*PLUGIN.split("/"))
    assert f"Plugin linked: {target}" in out and target.is_symlink(), out  # idempotency: below
    _assert_every_operator(_plugin_check(py, env)[0], venv)


# --------------------------------------------------------------------------- plugin install


def test_plugin_install_is_idempotent_links_or_copies(tmp_path):
    from fiftyone_nola.plugin_install import PLUGIN_FILES, install_plugin, plugin_source

    first = install_plugin(str(tmp_path))
    target = tmp_path.joinpath(*PLUGIN.split("/"))
    assert first.action == "linked" and first.target == target and target.resolve() == plugin_source()
    assert install_plugin(str(tmp_path)).action == "unchanged"
    # --copy replaces the link with the plugin's own files only (not a whole source checkout)
    assert install_plugin(str(tmp_path), copy=True).action == "copied"
    assert not target.is_symlink() and sorted(p.name for p in target.iterdir()) == sorted(PLUGIN_FILES)
    assert install_plugin(str(tmp_path), copy=True).action == "unchanged"
    (target / "operators" / "review.py").write_text("# stale\n")
    assert install_plugin(str(tmp_path), copy=True).action == "copied"
    assert install_plugin(str(tmp_path)).action == "linked"


def test_plugin_settings_fill_unset_environment_variables(monkeypatch):
    from types import SimpleNamespace

    import fiftyone as fo

    from fiftyone_nola.stages.plugin_settings import PLUGIN_NAME, apply_plugin_settings

    assert PLUGIN_NAME == PLUGIN
    for var in ("NOLA_MODELS_DIR", "NOLA_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NOLA_HOME", "/from/env")
    conf = SimpleNamespace(plugins={PLUGIN: {"home": "/from/settings", "models_dir": "/w", "device": "cpu"}})
    assert apply_plugin_settings(conf) == {"NOLA_MODELS_DIR": "/w", "NOLA_DEVICE": "cpu"}
    assert os.environ["NOLA_HOME"] == "/from/env"  # the environment wins over the settings
    assert apply_plugin_settings(SimpleNamespace(plugins={})) == {}
    # by default the settings are FiftyOne's App config `plugins` entry
    monkeypatch.delenv("NOLA_DEVICE")
    monkeypatch.setitem(fo.app_config.plugins, PLUGIN, {"device": "cuda:1"})
    assert apply_plugin_settings() == {"NOLA_DEVICE": "cuda:1"}
