"""Progress bars for long work (training, retraining); silent when disabled or under CI."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("STAGECREDIT_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable that moves a rich progress bar by one unit."""
    if not progress_enabled(enabled) or total <= 0:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
