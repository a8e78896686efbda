"""Starts and progress of running jobs: noted on the engine thread, written by the worker loop in batches.

The engine thread never writes to the database (on SQLite it would stall the GPU loop behind the
one write lock): its step events are published live to SSE and noted in ``engine.jobnotes``; the loop
writes the starts of a whole UNet batch in one transaction each turn, and the progress of all
running jobs in one transaction at most every ``engine.worker.PROGRESS_FLUSH_S``.
"""

from __future__ import annotations

import base64
import contextlib

from imagegenx.engine.engine import Engine
from imagegenx.engine.held_tasks import HeldTasks
from imagegenx.engine.service import Service
from imagegenx.storage.database import StorageUnavailable
from imagegenx.types import JobStatus, ProgressEvent, TaskStatus

__all__ = ["ProgressWriter"]


class ProgressWriter:
    def __init__(self, service: Service, engine: Engine, held: HeldTasks) -> None:
        self.service = service
        self.engine = engine
        self._held = held

    def on_engine_event(self, event: ProgressEvent) -> None:
        """Runs on the engine thread: no database I/O here (it would stall the GPU loop on SQLite's
        write lock); the start and progress are noted for the loop to write in batches."""
        if event.status is not JobStatus.RUNNING or not event.total:
            return
        task_id = event.job_id
        job = self._held.in_flight.get(task_id)
        first = job is not None and not job.noted
        if first:
            job.noted = True
        progress = self._held.notes.step(
            task_id, event.step, event.total, start_attempt=job.attempt if first else None
        )
        data = {"status": str(TaskStatus.PROCESSING), "progress": progress}
        if event.preview:  # a small JPEG of the latents, for the page's queue
            data["preview"] = "data:image/jpeg;base64," + base64.b64encode(event.preview).decode()
        self.service.events.publish(task_id, data)

    def flush_starts(self) -> None:
        """Record the starts the engine reported since the last turn, in one transaction."""
        notes = self._held.notes
        starts = notes.take_starts()
        if not starts:
            return
        try:
            started = self.service.store.start_many(starts)
        except StorageUnavailable:  # try again next turn; the final commit records it otherwise
            notes.put_back_starts(starts)
            raise
        for task_id in starts:
            job = self._held.in_flight.get(task_id)
            if job is not None:
                job.started = task_id in started
            if task_id not in started:  # final or cancel requested meanwhile: stop it
                self.engine.cancel(task_id)
        # No notify here: the engine's step events told this process's SSE clients already, and a
        # status read now would reach them after newer progress.

    def flush_progress(self) -> None:
        """Write the latest progress of running jobs, in one transaction (at most every PROGRESS_FLUSH_S)."""
        progress = self._held.notes.take_progress()
        with contextlib.suppress(StorageUnavailable):  # progress is advisory: the next flush has newer
            self.service.store.set_progress_many(progress)
