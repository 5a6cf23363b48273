"""The core plugin: registers the model sources that ship with workbench (always loaded, before
any other plugin; ``workbench plugins`` lists it as ``core``)."""

from __future__ import annotations

from collections.abc import Callable

from workbench.hookspecs import hookimpl
from workbench.models.registry import ModelSource


@hookimpl
def register_models(register: Callable[[ModelSource], None]) -> None:
    from workbench.models.sources import builtin_sources

    for source in builtin_sources():
        register(source)
