"""The repo root is a FiftyOne plugin: discovered by FiftyOne's own machinery, every operator registered."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

MANIFEST = yaml.safe_load((REPO / "fiftyone.yml").read_text())
PLUGIN = MANIFEST["name"]


def test_plugin_is_discovered_and_every_manifest_operator_registers():
    import fiftyone.operators as foo
    import fiftyone.plugins as fop

    names = [p.name for p in fop.list_plugins()]
    assert PLUGIN in names
    uris = {op.uri for op in foo.list_operators()}
    missing = [f"{PLUGIN}/{name}" for name in MANIFEST["operators"] if f"{PLUGIN}/{name}" not in uris]
    assert not missing, missing
    # and nothing registered that the manifest does not declare
    ours = {u for u in uris if u.startswith(PLUGIN + "/")}
    assert ours == {f"{PLUGIN}/{n}" for n in MANIFEST["operators"] + MANIFEST.get("panels", [])}
    panels = {op.name for op in foo.list_operators() if op.uri.startswith(PLUGIN + "/") and isinstance(op, foo.Panel)}
    assert panels == set(MANIFEST["panels"])  # the review panels are registered as panels


def test_fiftyone_cli_lists_plugin_and_operators():
    env = dict(os.environ)
    fo_cli = [str(Path(sys.executable).parent / "fiftyone")]
    out = subprocess.run(fo_cli + ["plugins", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert PLUGIN in out.stdout, out.stdout + out.stderr
    out = subprocess.run(fo_cli + ["operators", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert f"{PLUGIN}/auto_label" in out.stdout, out.stdout + out.stderr
