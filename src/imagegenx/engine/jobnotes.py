"""What the engine thread reports about running jobs, kept for the worker loop to write in batches.

The engine thread must not wait on the database: on SQLite every write queues on the one write lock,
and the GPU loop would stall behind the API's commits. So a job's first step and its progress are only
noted here; the worker loop writes the starts of a whole UNet batch in one transaction each turn, and
the progress of all running jobs in one transaction at most every flush interval
(``engine.worker.PROGRESS_FLUSH_S``). Progress moves in steps of at least 5%, and the last step's is
never noted: the success, which says 100, follows it at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["JobNotes"]


class JobNotes:
    """Thread-safe: the engine thread notes, the worker loop takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: dict[str, int] = {}  # task id -> attempt, start not written yet
        self._progress: dict[str, int] = {}  # task id -> latest progress not written yet
        self._last: dict[str, int] = {}  # task id -> last progress noted

    def step(self, task_id: str, step: int, total: int, *, start_attempt: int | None = None) -> int:
        """Note a step the engine reported (``start_attempt`` on a job's first report); returns its
        progress 0-99 for the live events."""
        progress = min(99, int(100 * step / total))
        with self._lock:
            if start_attempt is not None:
                self._starts[task_id] = start_attempt
            if 0 < step < total and progress - self._last.get(task_id, -100) >= 5:
                self._last[task_id] = progress
                self._progress[task_id] = progress
        return progress

    def take_starts(self) -> dict[str, int]:
        """The starts noted since the last take (task id -> attempt); they are the caller's to write."""
        with self._lock:
            starts, self._starts = self._starts, {}
        return starts

    def put_back_starts(self, starts: dict[str, int]) -> None:
        """Starts taken but not written (the database was away): the next take returns them again."""
        with self._lock:
            self._starts = starts | self._starts

    def take_progress(self) -> dict[str, int]:
        """The latest progress of each job noted since the last take."""
        with self._lock:
            progress, self._progress = self._progress, {}
        return progress

    def forget(self, task_ids: Iterable[str]) -> set[str]:
        """Jobs that finished: drop their notes. Returns those whose start was not written yet (their
        final commit records it)."""
        unwritten = set()
        with self._lock:
            for task_id in task_ids:
                if self._starts.pop(task_id, None) is not None:
                    unwritten.add(task_id)
                self._progress.pop(task_id, None)
                self._last.pop(task_id, None)
        return unwritten
