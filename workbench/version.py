"""The package version, in the lowest layer so that every module can record it without importing
the ``workbench`` package facade (which re-exports the plugin marker and the upper layers)."""

__version__ = "0.1.0"
