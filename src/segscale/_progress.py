"""One progress bar for long work (training epochs, preparing and augmenting stores)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class progress_bar:
    """A rich progress bar on a terminal, nothing in logs (and nothing where `enabled` is false,
    e.g. on ranks other than 0); yields an `advance()` function."""

    def __init__(self, enabled: bool, description: str, total: int, completed: int = 0) -> None:
        self.enabled, self.description, self.total, self.completed = (
            enabled,
            description,
            total,
            completed,
        )
        self.bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        from rich.console import Console

        console = Console(stderr=True)
        if not (self.enabled and self.total and console.is_terminal):
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=console,
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total, completed=self.completed)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
