"""The plugin contract: every hook a workbench plugin may implement.

Hooks are *registration* hooks in the style of ``llm`` and ``datasette``: each receives a
``register`` callback and calls it once per object it contributes. Adding fields to the registered
objects later does not break plugins; pluggy also lets an implementation accept fewer arguments
than the spec names.

A plugin is a module (or object) with functions decorated by :data:`workbench.hookimpl`::

    from workbench import hookimpl
    from workbench.models import ModelSource

    @hookimpl
    def register_models(register):
        register(ModelSource(name="my-model", ...))

and is found through the ``workbench`` entry-point group::

    [project.entry-points.workbench]
    my_plugin = "my_package.my_plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from workbench.models.registry import ModelSource

PROJECT = "workbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_models(register: Callable[[ModelSource], None]) -> None:
    """Contribute named model sources.

    Called once, when the model registry is first built (``workbench models``, ``load_model``).
    Not ``firstresult``: every plugin's sources are collected. Registering a name (or alias) that
    another plugin already registered is an error naming both plugins.

    :param register: call ``register(ModelSource(...))`` once per model. Loading must be lazy:
        import torch or transformers inside ``ModelSource.load``, never at module import, so that
        listing models stays fast.
    """
