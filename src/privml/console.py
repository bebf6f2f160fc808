"""The command line's consoles: rich on a terminal, plain and unwrapped when piped.

rich wraps output that is not a terminal at 80 columns, which breaks table rows across lines
in files and pipes. :class:`PlainWhenPiped` keeps a table's natural width there, whatever
``COLUMNS`` says (a terminal's width means nothing to a file); rich already drops colours when
not on a terminal.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

__all__ = ["PIPED_WIDTH", "PlainWhenPiped"]

PIPED_WIDTH = 1000
"""Columns available to a table when the output is a file or a pipe (no wrapping before)."""


class PlainWhenPiped(Console):
    """A rich Console whose width is :data:`PIPED_WIDTH` when its file is not a terminal."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("highlight", False)
        super().__init__(**kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if not self.is_terminal:
            return ConsoleDimensions(PIPED_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size
