"""The GPU side of the service: lease jobs, run them on the engine, store results, acknowledge.

Durability order for every job: result blobs written (fixed keys, so a retry overwrites), then
the task row committed (fenced by attempt number, so a stale attempt never wins), then the queue
lease acknowledged. On the embedded queue the last two are one transaction. A process killed
anywhere in between leaves a lease that comes back and is either finished again or, if the row is
already final, simply acknowledged.

Database writes are few and batched, because each is a commit (an fsync on SQLite) and SQLite has
one write lock for the whole process: the engine thread never writes (its events only note starts
and progress, ``engine.jobnotes``), the loop records the starts of a whole UNet batch in one
transaction, progress at most every ``PROGRESS_FLUSH_S``, and a finished group commits its rows and
acks together. A 1-step job that starts and finishes between two loop turns has its start folded
into that same commit.

This module is the worker's life cycle and its loop; each part of a task's way lives in its own:

- ``engine.intake``: lease tasks and submit them to the engine (``engine.portrait_runner`` for portraits)
- ``engine.progress_writer``: the engine thread's starts and progress, written in batches
- ``engine.outcomes``: finished jobs post-processed, stored (``engine.result_images``) and committed
- ``engine.held_tasks``: the leases held meanwhile, and how a task ends (ack and notify)
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from imagegenx.engine.engine import Engine
from imagegenx.engine.held_tasks import HeldTasks
from imagegenx.engine.intake import Intake
from imagegenx.engine.outcomes import OutcomeWriter
from imagegenx.engine.portrait_runner import PortraitRunner
from imagegenx.engine.progress_writer import ProgressWriter
from imagegenx.engine.service import Service
from imagegenx.storage.database import StorageUnavailable

__all__ = ["CANCEL_POLL_S", "PROGRESS_FLUSH_S", "ServiceWorker", "default_owner"]

log = logging.getLogger("imagegenx.worker")

CANCEL_POLL_S = 0.5  # how often the task rows of running jobs are checked for a cancel request
PROGRESS_FLUSH_S = 0.5  # progress reaches the database at most this often (SSE hears every step)


def default_owner() -> str:
    """Stable per host and role, so a restarted single-process server reclaims its own leases."""
    return f"serve@{socket.gethostname()}"[:64]


class ServiceWorker:
    def __init__(
        self, service: Service, engine: Engine, *, owner: str | None = None, capacity: int | None = None
    ) -> None:
        self.service = service
        self.engine = engine
        self.owner = owner or default_owner()
        self.lease_s = service.settings.service.lease_s
        self._stop = threading.Event()
        self._draining = threading.Event()  # no new leases: the process is shutting down
        self._held = HeldTasks(service, self.owner)
        self._portraits = PortraitRunner(service, engine, self._held, self._stop.is_set)
        # Lease only what the engine can start soon (a running batch and the next one), plus one
        # finished batch being stored: the rest stays queued for other workers.
        max_batch = service.settings.engine.max_batch
        self._intake = Intake(
            service,
            engine,
            self._held,
            self._portraits,
            capacity=capacity or 2 * max_batch,
            lease_s=self.lease_s,
            storing_allowance=max_batch,
        )
        self._progress = ProgressWriter(service, engine, self._held)
        self._outcomes = OutcomeWriter(service, engine, self._held)
        self._unsubscribe_cancels: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="imagegenx-worker", daemon=True)
        if service.cancel_bus is not None:  # cancels from any process (an API node) reach this engine
            self._unsubscribe_cancels = service.cancel_bus.subscribe(self.cancel)
        else:
            service.on_cancel = self.cancel
        engine.subscribe(self._progress.on_engine_event)

    @property
    def capacity(self) -> int:
        """How many tasks this worker runs or queues at most (one batch being stored comes on top)."""
        return self._intake.capacity

    def start(self) -> None:
        # A previous process with our owner id is dead (one server per host in embedded mode).
        reclaimed = self.service.queue.release_owner(self.owner)
        if reclaimed:
            log.info("reclaimed %d job(s) from a previous run", reclaimed)
        self._thread.start()

    def stop(self) -> None:
        self._stop_loop()
        self._outcomes.shutdown()
        self._portraits.shutdown()

    def _stop_loop(self) -> None:
        if self._unsubscribe_cancels is not None:
            self._unsubscribe_cancels()
            self._unsubscribe_cancels = None
        self._stop.set()
        self._thread.join(timeout=30)

    def cancel(self, task_id: str) -> None:
        self.engine.cancel(task_id)

    def drain(self, timeout_s: float) -> list[str]:
        """Graceful shutdown: take no more jobs, let those in hand finish for up to ``timeout_s``,
        then stop, store what finished, and give back the jobs still running (ready again at once
        for other workers). Returns the task ids given back."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        while self._held and time.monotonic() < deadline:
            time.sleep(0.1)
        # The loop stops before any job is cancelled here: it would take such a job as finished and
        # store it as a user's cancel (acknowledged: lost) instead of giving it back.
        self._stop_loop()
        if finished := self._held.take_finished():  # ended on their own meanwhile: stored as usual
            self._outcomes.submit(finished)
        running = list(self._held.in_flight)
        for task_id in running:  # they run again from the start elsewhere: stop them here
            self.engine.cancel(task_id)
        given_back = self._give_back(running)
        self._outcomes.shutdown()  # the jobs being stored finish storing
        # What is held still is a portrait in progress: it stops at its next stage, given back too.
        given_back += self._give_back(list(self._held.storing))
        self._portraits.shutdown()
        return given_back

    def _give_back(self, task_ids: list[str]) -> list[str]:
        return [task_id for task_id in task_ids if self.service.queue.nack(self.owner, task_id)]

    # Loop ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_heartbeat = last_sweep = last_purge = last_cancel_check = last_progress = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                finished = self._held.take_finished()
                if finished:  # one group: one chain batch, one commit
                    self._outcomes.submit(finished)
                self._progress.flush_starts()
                if now - last_progress > PROGRESS_FLUSH_S:
                    self._progress.flush_progress()
                    last_progress = now
                if not self._draining.is_set():
                    self._intake.lease_more()
                if now - last_heartbeat > self.lease_s / 3:
                    self.service.queue.heartbeat(self.owner, self._held.ids(), self.lease_s)
                    last_heartbeat = now
                if self._held.in_flight and now - last_cancel_check > CANCEL_POLL_S:
                    self._check_cancels()
                    last_cancel_check = now
                if now - last_sweep > 1.0:
                    self.service.expire_stale()
                    self.service.queue.recover_expired()
                    self.service.blobs.sync_spool()
                    last_sweep = now
                if now - last_purge > 3600:
                    self._purge_old_history()
                    last_purge = now
                self._wait_for_work()
            except StorageUnavailable as exc:  # the database is down: wait, lose nothing
                log.warning("storage unavailable, retrying: %s", exc)
                self._stop.wait(1.0)
            except Exception:  # never let one bad job kill the worker
                log.exception("worker loop error")
                self._stop.wait(0.5)

    def _check_cancels(self) -> None:
        """A cancel through another process (an API node) only marks the task row: stop such jobs
        here at their next step. Rows gone final meanwhile (expired, failed by a sweep) stop too."""
        for record in self.service.store.get_many(list(self._held.in_flight)):
            if record.cancel_requested or record.status.final:
                self.engine.cancel(record.task_id)

    def _purge_old_history(self) -> None:
        """Tasks past the history window go, with their images (seed 003: 90 days)."""
        cutoff = time.time() - self.service.settings.storage.history_days * 86400
        for record in self.service.store.purge_before(cutoff):
            self.service.blobs.delete_prefix(f"results/{record.task_id}/")
            self.service.blobs.delete_prefix(f"inputs/{record.task_id}/")

    def _wait_for_work(self) -> None:
        """Sleep until the engine finishes a job, for one loop turn at the most."""
        try:
            task_id = self._held.done.get(timeout=0.05)
        except queue.Empty:
            return
        self._held.done.put(task_id)
