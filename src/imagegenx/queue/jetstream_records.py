"""The KV side of the JetStream queue: one :class:`Record` per queued task id, changed by compare-and-set.

See :mod:`imagegenx.queue.jetstream` for why the records exist. Everything here runs on the queue's
NATS loop (:mod:`imagegenx.queue.natsloop`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from imagegenx.queue.natsloop import pull_now

READY = "ready"
LEASED = "leased"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what KV keys, bucket and stream names may be
DELETE = object()  # what a record change returns to delete the record


@dataclass(frozen=True)
class Record:
    """One queued job as the KV bucket stores it (JSON)."""

    task_id: str
    token: str  # this submit's id; its message carries it, so a message of an earlier submit is stale
    lane: int
    batch_key: str
    enqueued_at: float
    available_at: float
    state: str = READY
    owner: str | None = None
    lease_until: float | None = None
    deliveries: int = 0
    reply: str | None = None  # the held message's ack subject

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Record:
        return cls(**json.loads(data))

    def ready(self, **changes) -> Record:
        return replace(self, state=READY, owner=None, lease_until=None, reply=None, **changes)


def record_key(task_id: str) -> str:
    """The KV key of a task id: itself where KV allows it, else hex ('=' cannot start a plain id)."""
    return task_id if NAME.fullmatch(task_id) else "=" + task_id.encode().hex()


class RecordStore:
    """The KV bucket of one queue: get, compare-and-set change, and a scan of every record."""

    def __init__(self, js: Any, bucket: str, timeout_s: float) -> None:
        self._js = js
        self.bucket = bucket
        self.kv_stream = f"KV_{bucket}"
        self._timeout_s = timeout_s
        self.kv: Any = None
        # What this client last wrote of the leases it took (record, revision): an ack or heartbeat
        # from the same client then needs no read first.
        self._held: dict[str, tuple[Record, int]] = {}

    async def open(self) -> None:
        """Create the bucket if it is missing (one value per key: no history is needed)."""
        self.kv = await self._js.create_key_value(bucket=self.bucket, history=1)

    async def create(self, record: Record) -> bool:
        """Store ``record`` unless its task id has one: ``False`` then (atomic, for every client)."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self.kv.create(record_key(record.task_id), record.encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def drop(self) -> None:
        await self._js.delete_key_value(self.bucket)

    async def get(self, task_id: str) -> tuple[Record, int] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(record_key(task_id))
        except KeyNotFoundError:
            return None
        return Record.decode(entry.value), entry.revision

    async def change(
        self,
        task_id: str,
        change: Callable[[Record], Record | object | None],
        found: tuple[Record, int] | None = None,
    ) -> Record | None:
        """Compare-and-set ``change(record)`` (a new record, ``DELETE``, or None to leave it).

        Returns the record as it was before a change that was written, else None. The first try uses
        ``found`` (a record and revision the caller read) or what this client last wrote as a lease;
        only a record read just now can make the change give up.
        """
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        guess = found or self._held.get(task_id)
        for _ in range(100):
            current = guess or await self.get(task_id)
            if current is None:
                return None
            record, revision = current
            new = change(record)
            if new is None:
                if guess is None:
                    return None
                guess = None  # maybe out of date: read it
                continue
            try:
                self._held.pop(task_id, None)
                if new is DELETE:
                    await self.kv.delete(record_key(task_id), last=revision)
                else:
                    revision = await self.kv.update(record_key(task_id), new.encode(), last=revision)
                    if new.state == LEASED and len(self._held) < 100_000:
                        self._held[task_id] = (new, revision)
                return record
            except (KeyWrongLastSequenceError, APIError) as exc:
                if getattr(exc, "err_code", 10071) not in (10071, 10164):  # not "wrong last sequence"
                    raise
                guess = None  # someone else changed it meanwhile: read again
        raise RuntimeError(f"task {task_id}: too many concurrent changes to its queue record")

    async def scan(self) -> list[tuple[Record, int]]:
        """Every record and its revision: the bucket's latest values through a short-lived consumer.

        (Not nats-py's KV watcher: its end-of-values marker can go missing under concurrent writes.)
        """
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            filter_subject=f"$KV.{self.bucket}.>",
            inactive_threshold=30.0,  # gone by itself should we die before deleting it
            mem_storage=True,
        )
        consumer = await self._js.add_consumer(self.kv_stream, config)
        found = []
        try:
            while batch := await pull_now(self._js._nc, self.kv_stream, consumer.name, 1000, self._timeout_s):
                for msg in batch:
                    if not (msg.headers or {}).get("KV-Operation"):  # DEL / PURGE: a tombstone
                        found.append((Record.decode(msg.data), msg.metadata.sequence.stream))
                if len(batch) < 1000:
                    break
        finally:
            await self._js.delete_consumer(self.kv_stream, consumer.name)
        return found
