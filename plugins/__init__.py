"""workbench's first-party plugins (installed as the ``workbench_plugins`` package).

Each module is registered in the ``workbench`` entry-point group in ``pyproject.toml`` and loads
exactly as a third-party plugin would.
"""
