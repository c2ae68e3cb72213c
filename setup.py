"""Packaging beyond pyproject.toml: the FiftyOne plugin ships inside the wheel.

``fiftyone.yml``, ``requirements.txt`` and ``operators/`` live at the repository root (the root is
the plugin directory for ``fiftyone plugins download``); the wheel copies them to
``fiftyone_nola/_plugin`` so ``fiftyone-nola plugin install`` can link them into FiftyOne.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PLUGIN_FILES = [
    "fiftyone.yml",
    "requirements.txt",
    *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "operators").glob("*.py")),
]


class BuildPyWithPlugin(build_py):
    """build_py, plus the plugin files under fiftyone_nola/_plugin."""

    def run(self):
        super().run()
        for name in PLUGIN_FILES:
            dest = Path(self.build_lib, "fiftyone_nola", "_plugin", name)
            self.mkpath(str(dest.parent))
            self.copy_file(str(ROOT / name), str(dest))


setup(cmdclass={"build_py": BuildPyWithPlugin})
