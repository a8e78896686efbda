"""The tasks a worker holds a lease on, and how each one ends.

A task is held from its lease until its outcome is committed: first *in flight* (the engine runs it),
then *storing* (its post-processing and blob writes run on the post thread, or a portrait's stages
run on the portrait pool). The worker loop heartbeats every held lease, so none expires while the
task is being worked on.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass

from opentelemetry import trace

from imagegenx.engine.jobnotes import JobNotes
from imagegenx.engine.service import Service
from imagegenx.queue.base import Lease

__all__ = ["HeldTasks", "InFlight"]


@dataclass
class InFlight:
    """A job the engine runs."""

    lease: Lease
    attempt: int
    span: trace.Span
    future: Future | None = None
    started: bool = False  # the start is committed
    noted: bool = False  # the engine reported its first step (the start is written soon)


class HeldTasks:
    """Shared by the loop, the engine thread (reads), the post thread and the portrait pool."""

    def __init__(self, service: Service, owner: str) -> None:
        self.service = service
        self.owner = owner
        self.in_flight: dict[str, InFlight] = {}
        # Jobs the engine finished whose post-processing and storing runs on the post thread, so
        # the loop keeps leasing and heartbeating meanwhile (their leases stay ours until acked).
        self.storing: set[str] = set()
        self.notes = JobNotes()  # noted by the engine thread, written by the loop
        self.done: queue.Queue[str] = queue.Queue()  # jobs whose engine future is done

    def __len__(self) -> int:
        return len(self.in_flight) + len(self.storing)

    def ids(self) -> list[str]:
        """Every task whose lease is held (to heartbeat, or to give back)."""
        return [*list(self.in_flight), *list(self.storing)]

    def take_finished(self) -> list[InFlight]:
        """The jobs the engine finished since the last take, moved from in flight to storing."""
        finished = []
        while True:
            try:
                task_id = self.done.get_nowait()
            except queue.Empty:
                break
            entry = self.in_flight.pop(task_id, None)
            if entry is not None:
                entry.span.end()
                self.storing.add(task_id)
                finished.append(entry)
        if finished:
            self.notes.forget(entry.lease.task_id for entry in finished)  # unwritten starts: job.started
        return finished

    def finish(self, task_id: str) -> None:
        """The task's outcome is recorded: acknowledge its lease and tell its listeners."""
        self.service.queue.ack(self.owner, task_id)
        self.notes.forget([task_id])
        self.service.notify(task_id)
