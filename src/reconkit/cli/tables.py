"""The console the commands print their summary tables on.

Rich is imported inside the function, as in every command module: importing ``rich.console`` before Lightning
(pytest collecting this module was enough) left ``typing``'s cache holding ``Union[float, int]``, so Lightning's
``limit_train_batches: Optional[Union[int, float]]`` came out float-first and jsonargparse read
``--trainer.limit_train_batches 1`` as 1.0, the whole epoch (``test_architecture``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def table_console() -> Console:
    """Rich's console on stdout, 200 columns wide when stdout is not a terminal (a pipe or a log file): Rich's 80
    columns there cut file names (``file_brain_AXFLAIR_200_600…`` for two different files) and numbers, and a row
    should stay one line that ``grep`` finds. Give the name columns ``overflow="fold"`` so that a narrow terminal
    wraps a name rather than cutting it."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)
