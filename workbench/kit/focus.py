"""The focus protocol: how the terminal UI tells a result view the focused prompt and token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from workbench.store.reader import Run


@runtime_checkable
class Focus(Protocol):
    """What a view reads of the UI's focus (the app passes its own state object, which has more
    fields; read it, never change it)."""

    @property
    def prompt(self) -> int:
        """Index of the focused prompt in the run."""
        ...

    @property
    def pos(self) -> int:
        """Focused token (position) of the prompt's main stream."""
        ...


@runtime_checkable
class FollowsFocus(Protocol):
    """A view that follows the focused prompt and token. The app calls ``follow`` when the view
    is shown and whenever the focused prompt or token changes while it is on screen; a view whose
    ``follow`` raises is reported once and no longer asked."""

    def follow(self, run: Run, focus: Focus) -> None:
        """Show ``focus`` (``focus.prompt``, ``focus.pos``) of ``run`` (the run on screen)."""
        ...
