"""A portrait task in the worker: its stages run on a pool of their own, and its outcome is recorded there.

A portrait waits on the engine a lot (several generations, face checks between them), so it does not
hold the worker loop; its lease counts as *storing* while it runs, which keeps it heartbeated. The
stages themselves are ``engine.portrait_task``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from imagegenx.engine.engine import Engine
from imagegenx.engine.held_tasks import HeldTasks
from imagegenx.engine.service import Service
from imagegenx.storage.blobs import BlobWriteError
from imagegenx.types import TaskRecord, UserError

__all__ = ["PortraitRunner"]

log = logging.getLogger("imagegenx.worker")


class PortraitRunner:
    def __init__(
        self, service: Service, engine: Engine, held: HeldTasks, stopping: Callable[[], bool]
    ) -> None:
        self.service = service
        self.engine = engine
        self._held = held
        self._stopping = stopping  # true once the worker stops: a portrait gives its lease up
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="imagegenx-portrait")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)  # a portrait cut short runs again

    def begin(self, record: TaskRecord) -> None:
        """A portrait task runs its stages on the portrait pool (it waits on the engine a lot)."""
        attempt = record.attempts + 1
        if not self.service.store.start(record.task_id, attempt):
            self._held.finish(record.task_id)
            return
        self.service.notify(record.task_id)
        self._held.storing.add(record.task_id)  # heartbeats keep its lease while it runs
        self._pool.submit(self._run, record, attempt)

    def _run(self, record: TaskRecord, attempt: int) -> None:
        from imagegenx.engine.portrait_task import PortraitCanceled, WorkerStopping, run_portrait_task

        service, task_id, held = self.service, record.task_id, self._held

        def publish(data: dict) -> None:
            service.events.publish(task_id, data)

        try:
            results, metadata = run_portrait_task(service, self.engine, record, publish, self._stopping)
            service.store.succeed(task_id, attempt, results, metadata)
        except WorkerStopping:  # the lease stays: after it expires the task runs again elsewhere
            held.storing.discard(task_id)
            return
        except PortraitCanceled:
            service.store.mark_canceled(task_id)
        except UserError as exc:
            service.store.fail(task_id, str(exc), attempt)
        except BlobWriteError as exc:  # nothing reported as done: the task runs again later
            log.error("could not store results of %s: %s", task_id, exc)
            service.queue.nack(held.owner, task_id, delay_s=5.0)
            held.storing.discard(task_id)
            return
        except Exception as exc:  # a bug fails this task with the reason, never the worker
            log.exception("portrait task %s failed", task_id)
            service.store.fail(task_id, f"internal error: {exc!r}", attempt)
        held.storing.discard(task_id)
        held.finish(task_id)
