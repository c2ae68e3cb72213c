"""FiftyOne-aware stages: library functions that read and write FiftyOne datasets."""

from fiftyone_nola.stages.plugin_settings import apply_plugin_settings

apply_plugin_settings()  # the plugin's settings in FiftyOne's App config fill unset NOLA_* variables
