"""``fiftyone-nola plugin install``: make the FiftyOne plugin shipped with the package visible to FiftyOne.

The wheel carries the plugin (``fiftyone.yml``, ``requirements.txt``, ``operators/``) as
``fiftyone_nola/_plugin`` (see setup.py); a source checkout is itself the plugin directory.
Installing links (or copies) that directory to ``<plugins_dir>/@fiftyone-nola/nola``, the place
``fiftyone plugins download`` would use, so FiftyOne finds it without any environment variable.
"""

from __future__ import annotations

import filecmp
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import fiftyone.core.config as focn
import yaml

from fiftyone_nola.core.errors import InvalidInputError

PACKAGE_DIR = Path(__file__).resolve().parent
# What the plugin is made of (a source checkout holds much more: only these are copied).
PLUGIN_FILES = ("fiftyone.yml", "requirements.txt", "operators")


def plugin_source() -> Path:
    """The plugin directory of this installation: the wheel's ``_plugin`` or the source checkout."""
    for d in (PACKAGE_DIR / "_plugin", PACKAGE_DIR.parent):
        if all((d / name).exists() for name in PLUGIN_FILES):
            return d
    raise InvalidInputError(
        f"No FiftyOne plugin found beside {PACKAGE_DIR}: this installation of "
        "fiftyone-nola was built without it. Reinstall from the wheel or the repo."
    )


def plugin_name(source: Path) -> str:
    """The plugin's name as its ``fiftyone.yml`` declares it (``@fiftyone-nola/nola``)."""
    return yaml.safe_load((source / "fiftyone.yml").read_text())["name"]


@dataclass
class InstallResult:
    """Where the plugin now is, what it points to or was copied from, and what was done."""

    target: Path
    source: Path
    action: str  # "linked", "copied", "unchanged"

    def message(self) -> str:
        how = "symbolic link to" if self.target.is_symlink() else "copy of"
        if self.action == "unchanged":
            return f"Plugin already installed at {self.target} ({how} {self.source}); nothing to do."
        return f"Plugin {self.action}: {self.target} ({how} {self.source})"


def _same_copy(target: Path, source: Path) -> bool:
    def same(c) -> bool:
        if c.left_only or c.right_only or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not mismatch and not errors and all(same(s) for s in c.subdirs.values())

    if {p.name for p in target.iterdir()} != set(PLUGIN_FILES):
        return False
    _, mismatch, errors = filecmp.cmpfiles(source, target, PLUGIN_FILES[:2], shallow=False)
    ops = filecmp.dircmp(source / "operators", target / "operators", ignore=["__pycache__"])
    return not mismatch and not errors and same(ops)


def _copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in PLUGIN_FILES[:2]:
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "operators", target / "operators", ignore=shutil.ignore_patterns("__pycache__"))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def install_plugin(plugins_dir: Optional[str] = None, copy: bool = False) -> InstallResult:
    """Link (or copy) the plugin into ``plugins_dir`` (default: FiftyOne's ``plugins_dir``).

    Idempotent: an up-to-date link or copy is left alone; anything else at the target (an older
    copy, a ``fiftyone plugins download`` of another version) is replaced.
    """
    source = plugin_source()
    root = Path(plugins_dir or focn.load_config().plugins_dir).expanduser()
    target = root.joinpath(*plugin_name(source).split("/"))
    if not copy and target.is_symlink() and target.resolve() == source.resolve():
        return InstallResult(target, source, "unchanged")
    if copy and target.is_dir() and not target.is_symlink() and _same_copy(target, source):
        return InstallResult(target, source, "unchanged")
    _remove(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            target.symlink_to(source, target_is_directory=True)
            return InstallResult(target, source, "linked")
        except OSError:  # no symlinks here (e.g. Windows without developer mode): copy instead
            pass
    _copy(source, target)
    return InstallResult(target, source, "copied")
