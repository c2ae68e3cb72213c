"""Make ``fiftyone_nola`` importable for a plugin installed by ``fiftyone plugins download``.

Such a plugin directory is this repository: the library sits beside ``operators/``, and FiftyOne
does not put the plugin directory on ``sys.path``. An installed ``fiftyone_nola`` (pip, or a
clone's editable install) is used as it is.
"""

import importlib.util
import sys
from pathlib import Path

PLUGIN_ROOT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("fiftyone_nola") is None and (PLUGIN_ROOT / "fiftyone_nola").is_dir():
    # Appended, not prepended: the plugin root also holds tests/, scripts/... that must not
    # shadow anything installed.
    sys.path.append(str(PLUGIN_ROOT))
