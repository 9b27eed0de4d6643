"""The console the commands print their summary tables on."""

from __future__ import annotations

from rich.console import Console


def table_console() -> Console:
    """Rich's console on stdout, 200 columns wide when stdout is not a terminal (a pipe or a log file): Rich's 80
    columns there cut file names (``file_brain_AXFLAIR_200_600…`` for two different files) and numbers, and a row
    should stay one line that ``grep`` finds. Give the name columns ``overflow="fold"`` so that a narrow terminal
    wraps a name rather than cutting it."""
    console = Console()
    return console if console.is_terminal else Console(width=200)
