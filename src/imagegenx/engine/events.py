"""Task events fan-out inside one process: the worker publishes, SSE streams and tests subscribe.

Each subscriber owns a bounded queue; a subscriber that stops reading loses old progress events
(never the process's memory), and the final event always gets through because it is also the one
the database holds.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import defaultdict

MAX_PENDING = 256


class TaskEvents:
    def __init__(self) -> None:
        self._subscribers: dict[str, list[queue.Queue]] = defaultdict(list)
        self._lock = threading.Lock()

    def subscribe(self, task_id: str) -> queue.Queue:
        q: queue.Queue = queue.Queue(MAX_PENDING)
        with self._lock:
            self._subscribers[task_id].append(q)
        return q

    def unsubscribe(self, task_id: str, q: queue.Queue) -> None:
        with self._lock:
            subscribers = self._subscribers.get(task_id, [])
            if q in subscribers:
                subscribers.remove(q)
            if not subscribers:
                self._subscribers.pop(task_id, None)

    def watched(self) -> list[str]:
        """Task ids somebody is subscribed to (an API node polls the database for these)."""
        with self._lock:
            return list(self._subscribers)

    def publish(self, task_id: str, event: dict) -> None:
        with self._lock:
            targets = list(self._subscribers.get(task_id, ()))
        for q in targets:
            while True:
                try:
                    q.put_nowait(event)
                    break
                except queue.Full:  # drop the oldest progress event, keep the newest
                    with contextlib.suppress(queue.Empty):
                        q.get_nowait()
