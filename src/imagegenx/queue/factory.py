"""Pick the queue and cancel-bus backends from ``QueueSettings`` (for the composition root).

``QueueSettings.url`` empty: the embedded queue on the task database and in-process cancels; a
``nats://`` url: JetStream and NATS. Backends are imported here, on demand, so a build without the
scale extra (nats-py) still runs embedded.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from imagegenx.config import QueueSettings
from imagegenx.queue.base import JobQueue
from imagegenx.queue.cancel import CancelBus, LocalCancelBus, NatsCancelBus


def open_queue(
    settings: QueueSettings,
    db_engine: Any,
    *,
    lease_s: float = 30.0,
    aging_s: float = 10.0,
    write_gate: Callable[[], AbstractContextManager[None]] | None = None,
) -> JobQueue:
    """The job queue: rows in ``db_engine``'s database, or JetStream at ``settings.url``.

    ``lease_s`` (``ServiceSettings.lease_s``) becomes the JetStream consumers' AckWait: a job whose
    worker stopped heartbeating comes back after it. Close a JetStream queue with ``close()``.
    """
    if not settings.url:
        from imagegenx.queue.embedded import EmbeddedQueue

        if db_engine is None:
            raise ValueError("the embedded queue needs the task database's engine")
        return EmbeddedQueue(db_engine, aging_s=aging_s, write_gate=write_gate)
    from imagegenx.queue.jetstream import JetStreamQueue

    return JetStreamQueue(settings.url, settings.stream, ack_wait_s=lease_s, aging_s=aging_s)


def open_cancel_bus(settings: QueueSettings) -> CancelBus:
    """In-process cancels for one process, or NATS subject ``<stream>.cancel`` when ``url`` is set."""
    if not settings.url:
        return LocalCancelBus()
    return NatsCancelBus(settings.url, settings.stream)
