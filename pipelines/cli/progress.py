"""Progress display for long steps (rich), safe to update from worker threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")


class StepProgress:
    """A line per step plus bars for counted work.

    Steps may run in several threads at once (publishing beside loading telemetry);
    each thread has its own current step, finished when that thread starts the next.
    """

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._local = threading.local()

    def __enter__(self) -> StepProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._finish_step()
        self._progress.__exit__(exc_type, exc, tb)

    def _finish_step(self) -> None:
        step: TaskID | None = getattr(self._local, "step", None)
        if step is not None:
            elapsed = time.perf_counter() - self._local.began
            self._progress.update(
                step, description=f"{self._local.label} ({elapsed:.1f} s)", total=1, completed=1
            )
            self._local.step = None

    def substep(self, name: str) -> None:
        """Start a new step line; this thread's previous one is marked done.

        An empty name only finishes the current step (a worker thread's last one).
        """
        self._finish_step()
        if not name:
            return
        self._local.label = name
        self._local.began = time.perf_counter()
        self._local.step = self._progress.add_task(name, total=None)

    def run(self, label: str, work: Callable[[], T]) -> T:
        self.substep(label)
        result = work()
        self._finish_step()
        return result

    def counter(self, label: str, total: int | None) -> Callable[[int], None]:
        """A callback that advances a bar of `total` items (None: unknown total)."""
        task: TaskID | None = None

        def advance(count: int) -> None:
            nonlocal task
            if task is None:
                task = self._progress.add_task(label, total=total)
            self._progress.advance(task, count)

        return advance
