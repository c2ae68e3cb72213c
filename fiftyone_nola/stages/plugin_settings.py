"""Settings of the FiftyOne plugin, FiftyOne's way: ``plugins`` in the App config.

In ``~/.fiftyone/app_config.json`` (or the file ``FIFTYONE_APP_CONFIG_PATH`` names)::

    {"plugins": {"@fiftyone-nola/nola": {"home": "/data/nola", "models_dir": "/data/weights",
                                          "device": "cuda:1"}}}

They fill the ``NOLA_*`` environment variables that are unset, when the stages are first imported
(the App server, delegated runs, the CLI and Python all import them), so the precedence is:
explicit argument (form field, CLI flag, function argument) > environment variable > plugin
setting > built-in default.
"""

from __future__ import annotations

import os

import fiftyone as fo

PLUGIN_NAME = "@fiftyone-nola/nola"
# plugin setting -> the environment variable the library reads
SETTINGS = {
    "home": "NOLA_HOME",
    "models_dir": "NOLA_MODELS_DIR",
    "device": "NOLA_DEVICE",
    "job_wait_s": "NOLA_JOB_WAIT_S",
}


def apply_plugin_settings(app_config=None) -> dict[str, str]:
    """Set each unset ``NOLA_*`` variable from the plugin's settings; returns what was set."""
    plugins = getattr(app_config or fo.app_config, "plugins", None) or {}
    settings = plugins.get(PLUGIN_NAME) or {}
    applied = {}
    for key, var in SETTINGS.items():
        value = settings.get(key)
        if value not in (None, "") and not os.environ.get(var):
            os.environ[var] = applied[var] = str(value)
    return applied
