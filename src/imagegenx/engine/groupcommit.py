"""Group commit for the service's writes: callers that arrive while a commit runs share the next one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from imagegenx.storage.tasks import TaskExists

__all__ = ["GroupCommit"]


class _Waiter:
    """One caller: its item, and how its commit went."""

    def __init__(self, item: Any) -> None:
        self.item = item
        self.wake = threading.Event()
        self.lead = False  # woken to commit the next group, not because its own was committed
        self.committed = False
        self.error: Exception | None = None


class GroupCommit:
    """Group commit: callers that arrive while a commit is running share the next one.

    SQLite has one write lock, and each commit syncs the disk; a request thread per commit would
    queue on the lock (the driver polls it, sleeping up to 100 ms between tries) and sync once per
    request. Here the first caller commits alone; whoever arrives meanwhile waits, and when that
    commit is done the oldest waiter commits for all of them at once (no extra thread: leadership
    passes from caller to caller). Every caller returns only after the commit holding its item,
    so nothing is acknowledged before it is durable.

    ``commit(items)`` writes all items in one transaction. When a group fails with ``TaskExists``
    its items are committed one by one, so only the offending caller sees the error; any other
    error (the database is away) reaches every caller of the group.
    """

    def __init__(self, commit: Callable[[list[Any]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._waiting: list[_Waiter] = []
        self._busy = False

    def run(self, item: Any) -> None:
        """Commit ``item`` (with whatever else is waiting); returns once it is committed."""
        me = _Waiter(item)
        with self._lock:
            self._waiting.append(me)
            lead, self._busy = not self._busy, True
        if not lead:
            me.wake.wait()
            lead = me.lead
        if lead:
            with self._lock:
                group, self._waiting = self._waiting, []
            try:
                self._commit_group(group)
            finally:
                with self._lock:
                    if self._waiting:  # the next group commits in its oldest caller's thread
                        self._waiting[0].lead = True
                        self._waiting[0].wake.set()
                    else:
                        self._busy = False
                for waiter in group:
                    if waiter is not me:
                        waiter.wake.set()
        if not me.committed:
            raise me.error or RuntimeError("the group commit was interrupted")

    def _commit_group(self, group: list[_Waiter]) -> None:
        try:
            self._commit([w.item for w in group])
            for waiter in group:
                waiter.committed = True
        except TaskExists as error:
            if len(group) == 1:
                group[0].error = error
                return
            for waiter in group:
                self._commit_group([waiter])
        except Exception as error:  # every caller of the group hears why
            for waiter in group:
                waiter.error = error
