"""Cancellation that reaches the worker running a job, wherever it runs.

The API node that cancels a task marks it in the task store and then ``publish``-es its id; every worker
``subscribe``-s once and, when it hears an id it is running, stops that job at its next step. Two
backends, picked by :func:`imagegenx.queue.factory.open_cancel_bus`:

* :class:`LocalCancelBus`: callbacks in this process (``imagegenx serve``, tests);
* :class:`NatsCancelBus`: core NATS subject ``<stream>.cancel`` (``QueueSettings.stream``), which every
  worker process subscribes to.

Core NATS delivers at most once: a worker that is disconnected when a cancel is published does not hear
it. The task store stays the truth, so a worker should still check a task's status where it checks
anyway (before it starts a job and before it commits results); the bus makes the common case quick.

Callbacks run on the bus's own thread (the NATS one for :class:`NatsCancelBus`): they must be quick and
must not block, for example set a flag or a ``threading.Event`` that the denoising loop reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from imagegenx.queue.natsloop import NatsThread

log = logging.getLogger(__name__)

Callback = Callable[[str], None]


@runtime_checkable
class CancelBus(Protocol):
    """Broadcast of cancelled task ids to every subscriber (every worker)."""

    def publish(self, task_id: str) -> None:
        """Tell every subscriber that ``task_id`` was cancelled."""
        ...

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(task_id)`` for each cancel from now on; returns a function that stops it."""
        ...

    def close(self) -> None: ...


def _call(callback: Callback, task_id: str) -> None:
    try:
        callback(task_id)
    except Exception:  # one subscriber's bug must not keep the cancel from the others
        log.exception("cancel callback failed for task %s", task_id)


class LocalCancelBus(CancelBus):
    """Subscribers in this process; ``publish`` calls them on the caller's thread before it returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callback] = {}
        self._next = 0

    def publish(self, task_id: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            _call(callback, task_id)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._callbacks[token] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._callbacks.pop(token, None)

        return unsubscribe

    def close(self) -> None:
        with self._lock:
            self._callbacks.clear()


class NatsCancelBus(CancelBus):
    """Cancels over core NATS subject ``<stream>.cancel``; one connection per bus."""

    def __init__(self, url: str, stream: str = "imagegenx") -> None:
        self.subject = f"{stream}.cancel"
        self._nats = NatsThread(url, f"imagegenx-cancel-{stream}")

    def publish(self, task_id: str) -> None:
        async def publish() -> None:
            await self._nats.nc.publish(self.subject, task_id.encode())
            await self._nats.nc.flush()  # on the wire before we return

        self._nats.run(publish())

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        async def handler(msg) -> None:
            _call(callback, msg.data.decode())

        async def subscribe():
            subscription = await self._nats.nc.subscribe(self.subject, cb=handler)
            await self._nats.nc.flush()  # the server has it: a cancel published after this reaches us
            return subscription

        subscription = self._nats.run(subscribe())
        done = threading.Event()

        def unsubscribe() -> None:
            if not done.is_set():
                done.set()
                self._nats.run(subscription.unsubscribe())

        return unsubscribe

    def close(self) -> None:
        self._nats.close()
