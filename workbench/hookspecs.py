"""The plugin contract: every hook a workbench plugin may implement.

Hooks are *registration* hooks in the style of ``llm`` and ``datasette``: each receives a
``register`` callback (or the object to extend) and the plugin calls it once per thing it
contributes. Adding fields to the registered objects later does not break plugins, and pluggy lets
an implementation accept fewer arguments than the spec names, so hooks can grow new arguments.

A plugin is a module (or object) with functions decorated by :data:`workbench.hookimpl`::

    from workbench import Analysis, hookimpl

    @hookimpl
    def register_analyses(register):
        register(Analysis(name="my-analysis", ...))

and is found through the ``workbench`` entry-point group (``[project.entry-points.workbench]``),
or as a loose ``.py`` file in a ``--plugins-dir`` folder. ``docs/writing-plugins.md`` documents
every hook below with an example; a test checks that it does.

Every hook is called once per plugin, guarded: a plugin whose hook raises is reported (a warning,
``workbench plugins``) and the other plugins' contributions are kept, unless
``WORKBENCH_STRICT_PLUGINS=1``. None of these hooks is ``firstresult``; their return values are
ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from workbench.analysis import Analysis
    from workbench.models.registry import ModelSource
    from workbench.views import View

PROJECT = "workbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""The marker plugins put on their hook implementations: ``@workbench.hookimpl``."""


@hookspec
def register_models(register: Callable[[ModelSource], None]) -> None:
    """Contribute named model sources.

    Called once, when the model registry is first built (``workbench models``, ``load_model``).
    Registering a name (or alias) that another plugin already registered is an error naming both
    plugins.

    :param register: call ``register(ModelSource(...))`` once per model. Loading must be lazy:
        import torch or transformers inside ``ModelSource.load``, never at module import, so that
        listing models stays fast.
    """


@hookspec
def register_analyses(register: Callable[[Analysis], None]) -> None:
    """Contribute analyses: computations over a stored run whose results are stored beside it.

    Called once, when the analysis registry is built (``workbench analyze``, ``workbench plugins``,
    ``workbench capture --for``). Two analyses with one name are both rejected, with an error
    naming both plugins.

    :param register: call ``register(Analysis(...))`` once per analysis. ``Analysis.compute`` runs
        only when the analysis is run: import torch or other heavy libraries inside it, not at
        module import.
    """


@hookspec
def register_views(register: Callable[[View], None]) -> None:
    """Contribute terminal views that show an analysis's stored results in ``workbench tui``.

    Called once, when the view registry is built. A result without a registered view is shown
    with a generic table and array view.

    :param register: call ``register(View(...))`` once per view. ``View.make`` is called only when
        the view is shown: import Textual inside it.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``workbench`` command line.

    Called once per process, when the command line is built, before arguments are parsed.
    A command whose name is already taken is refused with a warning.

    :param cli: the top-level ``click.Group``; use ``@cli.command()`` to add commands. Keep
        module import light: ``workbench --help`` loads every plugin.
    """
