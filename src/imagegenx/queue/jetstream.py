"""The NATS JetStream job queue: the :class:`~imagegenx.queue.base.JobQueue` contract for many processes.

Two JetStream objects per queue name ``S`` (``QueueSettings.stream``):

* the **stream** ``S`` (work-queue retention) holds one message per queued job on subject ``S.jobs.<lane>``,
  read by one durable pull consumer per priority lane (``P0`` .. ``P3``). A message is held by the
  worker that fetched it until it is acked (results committed: the message is deleted), nacked, or its
  consumer's ``AckWait`` (the lease time) passes without an ``in_progress`` heartbeat: then JetStream
  delivers it again, which is how a dead worker's jobs come back without anyone calling
  ``recover_expired``. Publishes carry ``Nats-Msg-Id`` = task id + submit token, so a retried publish
  (a lost PubAck) is stored once.
* the **KV bucket** ``S-jobs`` (:mod:`~imagegenx.queue.jetstream_records`) holds one record per queued
  task id: lane, batch key, times, state, owner, delivery count and the held message's ack subject. It
  is the truth about a job, written with compare-and-set on the entry's revision, which gives what a
  stream alone cannot: ``submit`` is ``create`` (atomic "if absent"); ack and remove delete the record,
  so the id is free again at once (the ``Nats-Msg-Id`` window would refuse it for two minutes); only
  the record's owner may ack or nack; ``depth``/``oldest_wait`` are exact (a scan of the bucket: cost
  grows with the queue). With the ack subject in the record any client (another process, after a
  restart) can ack, nak or heartbeat a held message. A message whose record is gone, or belongs to a
  later submit of the same id (the token differs), is stale: the lease that meets it acks it away.

A lease fetches what is ready in every lane (up to ``window`` messages each, no waiting), ranks it by the
contract's order from the messages' headers (effective lane ``lane - floor(wait / aging_s)``, then
enqueue time, then task id), and takes jobs in that order by compare-and-set on their records: the
best job that can be taken decides the batch key, then up to ``max_jobs`` of that key. Everything else
is nacked back at once, before the lease returns. Those naks do not count as deliveries: the delivery
count is the record's own, raised only when a lease takes the job (JetStream's ``num_delivered`` also
counts these looks, so it would trip the cap early). So no per-key subjects or consumers are needed;
the price is that a lease touches up to ``4 * window`` messages and that a batch-key top-up only sees
each lane's first ``window`` jobs. The JetStream consumers have no ``max_deliver``: the engine fails a
job whose ``Lease.delivery`` is over its cap (``ServiceSettings.max_deliveries``).

Clocks: records keep the caller's times (``now=``), so leases, nack delays and ``recover_expired`` follow
the caller's clock exactly, as the contract tests need. JetStream's own timers (``AckWait``, nak delays)
are real time: nak delays are sent only when the caller uses the real clock (``now`` omitted), since a
caller's fake time cannot be mapped onto the server's; the record's ``available_at`` decides either way.
A lease that finds a message JetStream redelivered (``AckWait`` passed) takes it when the record's lease
has run out too, and otherwise gives it back until then: keep ``AckWait`` equal to the lease time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from imagegenx.queue.base import LANES, JobQueue, Lease, check_duration, check_id, clock
from imagegenx.queue.jetstream_records import DELETE, LEASED, NAME, READY, Record, RecordStore
from imagegenx.queue.natsloop import NatsThread, pull_now

log = logging.getLogger(__name__)

JOB_HEADER = "Imagegenx-Job"  # JSON: task id, token, batch key, enqueue time (what a lease ranks by)


def message_headers(record: Record) -> dict[str, str]:
    """The headers of a job's message; ``Nats-Msg-Id`` makes a retried publish a duplicate."""
    job = [record.task_id, record.token, record.batch_key, record.enqueued_at]
    return {"Nats-Msg-Id": f"{record.task_id}:{record.token}", JOB_HEADER: json.dumps(job)}


@dataclass(frozen=True)
class _Pulled:
    """A message a lease fetched, with what its header says."""

    msg: Any
    lane: int
    task_id: str
    token: str
    batch_key: str
    enqueued_at: float

    @classmethod
    def of(cls, msg: Any, lane: int) -> _Pulled:
        return cls(msg, lane, *json.loads(msg.headers[JOB_HEADER]))

    def rank(self, now: float, aging_s: float) -> tuple[int, float, str]:
        """The contract's order: effective lane (``lane - floor(wait / aging_s)``), enqueue time, id."""
        wait = max(0.0, now - self.enqueued_at)
        return self.lane - math.floor(wait / aging_s), self.enqueued_at, self.task_id


def _nak_payload(delay_s: float) -> bytes:
    return b"-NAK" if delay_s <= 0 else b'-NAK {"delay": %d}' % int(delay_s * 1e9)


class JetStreamQueue(JobQueue):
    """:class:`~imagegenx.queue.base.JobQueue` over NATS JetStream (see the module docs).

    Connects (and creates the stream, the four lane consumers and the KV bucket if missing) when built;
    :meth:`close` disconnects. ``ack_wait_s`` is the consumers' ``AckWait``: the workers' lease time.
    """

    def __init__(
        self,
        url: str,
        stream: str = "imagegenx",
        *,
        ack_wait_s: float = 30.0,
        aging_s: float = 10.0,
        window: int = 16,
        timeout_s: float = 10.0,
    ) -> None:
        if not NAME.fullmatch(stream):
            raise ValueError(f"queue stream name must be 1-64 of A-Z a-z 0-9 _ -, got {stream!r}")
        if not (math.isfinite(aging_s) and aging_s > 0):
            raise ValueError(f"aging_s must be finite and > 0, got {aging_s}")
        if not (math.isfinite(ack_wait_s) and ack_wait_s > 0):
            raise ValueError(f"ack_wait_s must be finite and > 0, got {ack_wait_s}")
        self.stream = stream
        self.aging_s = float(aging_s)
        self._ack_wait_s = float(ack_wait_s)
        self._window = max(1, int(window))
        self._timeout_s = timeout_s
        self._nats = NatsThread(url, f"imagegenx-queue-{stream}", timeout_s=timeout_s)
        try:
            self._nats.run(self._setup())
        except Exception:
            self._nats.close()
            raise

    async def _setup(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
        from nats.js.errors import BadRequestError

        self._js = self._nats.nc.jetstream(timeout=self._timeout_s)
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.stream}.jobs.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=120.0,
        )
        try:
            await self._js.add_stream(config)
        except BadRequestError:  # it exists with other settings: take ours
            await self._js.update_stream(config)
        for lane in LANES:
            consumer = ConsumerConfig(
                durable_name=f"P{lane}",
                filter_subject=f"{self.stream}.jobs.{lane}",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait_s,
                max_ack_pending=1_000_000,  # every held job; the default (1000) would stall deliveries
            )
            await self._js.add_consumer(self.stream, consumer)  # or updates its AckWait
        self._records = RecordStore(self._js, f"{self.stream}-jobs", self._timeout_s)
        await self._records.open()

    def close(self) -> None:
        self._nats.close()

    def drop(self) -> None:
        """Delete the stream and the KV bucket with every queued job (tests, an operator's reset)."""
        self._nats.run(self._js.delete_stream(self.stream))
        self._nats.run(self._records.drop())

    # -- records --------------------------------------------------------------------------------------

    def records(self) -> dict[str, Record]:
        """Every queued job as stored (tests and diagnostics)."""
        return {r.task_id: r for r, _ in self._nats.run(self._records.scan())}

    # -- messages -------------------------------------------------------------------------------------

    async def _reply(self, subject: str | None, payload: bytes) -> None:
        """Ack, nak or ``in_progress`` a held message, waiting for the server to have done it."""
        if subject:
            await self._nats.nc.request(subject, payload, timeout=self._timeout_s)

    async def _publish(self, record: Record) -> None:
        """Publish ``record``'s message; a retry after a lost PubAck is de-duplicated by its msg id."""
        from nats.errors import TimeoutError as NatsTimeout

        headers = message_headers(record)
        for attempt in range(3):
            try:
                await self._js.publish(f"{self.stream}.jobs.{record.lane}", b"", headers=headers)
                return
            except NatsTimeout:
                if attempt == 2:
                    raise

    # -- JobQueue -------------------------------------------------------------------------------------

    def submit(self, task_id: str, lane: int, batch_key: str, *, now: float | None = None) -> bool:
        check_id("task_id", task_id)
        if lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {lane}")
        now = clock(now)
        return self._nats.run(self._submit(Record(task_id, uuid.uuid4().hex, int(lane), batch_key, now, now)))

    async def _submit(self, record: Record) -> bool:
        if not await self._records.create(record):
            return False  # queued already
        try:
            await self._publish(record)
        except BaseException:  # free the id again: the caller sees the error and may retry
            await self._records.change(record.task_id, lambda r: DELETE if r.token == record.token else None)
            raise
        return True

    def lease(
        self,
        owner: str,
        max_jobs: int,
        lease_s: float,
        *,
        batch_key: str | None = None,
        now: float | None = None,
    ) -> list[Lease]:
        check_id("owner", owner)
        check_duration("lease_s", lease_s)
        if max_jobs < 1:
            return []
        return self._nats.run(self._lease(owner, max_jobs, lease_s, batch_key, clock(now), now is None))

    async def _lease(
        self, owner: str, max_jobs: int, lease_s: float, batch_key: str | None, now: float, real: bool
    ) -> list[Lease]:
        nc, window = self._nats.nc, max(self._window, max_jobs)
        pulled = await asyncio.gather(
            *(pull_now(nc, self.stream, f"P{n}", window, self._timeout_s) for n in LANES)
        )
        # Ranked by what the messages say; the records then say which can be taken.
        jobs = sorted(
            (_Pulled.of(m, lane) for lane, ms in zip(LANES, pulled, strict=True) for m in ms),
            key=lambda j: j.rank(now, self.aging_s),
        )
        until = now + lease_s
        taken: dict[int, Lease] = {}  # id(message) -> its lease
        stale: set[int] = set()
        wait: dict[int, float] = {}  # id(message) -> seconds until it may be taken

        async def take(job: _Pulled) -> None:
            def change(r: Record) -> Record | None:
                if r.token != job.token:
                    return None
                # A leased record's message only comes back when JetStream redelivered it (AckWait
                # passed): takeable once the record's lease has run out too.
                due = r.lease_until if r.state == LEASED else r.available_at
                if due > now:
                    wait[id(job.msg)] = due - now
                    return None
                changes = dict(
                    owner=owner, lease_until=until, deliveries=r.deliveries + 1, reply=job.msg.reply
                )
                return replace(r, state=LEASED, **changes)

            before = await self._records.change(job.task_id, change)
            if before is not None:
                taken[id(job.msg)] = Lease(
                    job.task_id, before.lane, before.batch_key, before.deliveries + 1, until
                )
            elif id(job.msg) not in wait:
                stale.add(id(job.msg))  # acked or removed (and maybe submitted again) meanwhile

        tried = 0
        if batch_key is None:  # the best job that can be taken decides the key
            for job in jobs:
                tried += 1
                await take(job)
                if taken:
                    batch_key = job.batch_key
                    break
        more = [j for j in jobs[tried:] if j.batch_key == batch_key]
        while more and len(taken) < max_jobs:
            chunk, more = more[: max_jobs - len(taken)], more[max_jobs - len(taken) :]
            await asyncio.gather(*(take(j) for j in chunk))

        def answer(msg: Any) -> bytes:  # stale: gone for good; else back, when it may be taken
            return b"+ACK" if id(msg) in stale else _nak_payload(wait.get(id(msg), 0.0) if real else 0.0)

        rest = [j.msg for j in jobs if id(j.msg) not in taken]
        rest.sort(key=lambda m: m.metadata.sequence.stream)  # back in the stream's order
        await asyncio.gather(*(self._reply(m.reply, answer(m)) for m in rest))
        return [taken[id(j.msg)] for j in jobs if id(j.msg) in taken]

    async def _settle(
        self, owner: str, task_id: str, change: Callable, payload: bytes, *, wait: bool = True
    ) -> bool:
        """``change`` the record of a job ``owner`` holds, then send ``payload`` to its message."""
        before = await self._records.change(
            task_id, lambda r: change(r) if r.state == LEASED and r.owner == owner else None
        )
        if before is not None and before.reply:
            if wait:
                await self._reply(before.reply, payload)
            else:
                await self._nats.nc.publish(before.reply, payload)
        return before is not None

    def heartbeat(
        self, owner: str, task_ids: list[str], lease_s: float, *, now: float | None = None
    ) -> list[str]:
        check_duration("lease_s", lease_s)
        until = clock(now) + lease_s
        unique = list(dict.fromkeys(task_ids))

        async def extend() -> list[bool]:  # +WPI: JetStream's AckWait starts again
            extended = lambda r: replace(r, lease_until=until)  # noqa: E731
            return await asyncio.gather(*(self._settle(owner, t, extended, b"+WPI") for t in unique))

        return [t for t, ok in zip(unique, self._nats.run(extend()), strict=True) if ok]

    def ack(self, owner: str, task_id: str) -> bool:
        # The record goes first: the id is free and the ack is final even if the message's ack is lost
        # (the message is then stale: dropped by a lease), so that one is not waited for.
        return self._nats.run(self._settle(owner, task_id, lambda r: DELETE, b"+ACK", wait=False))

    def nack(self, owner: str, task_id: str, delay_s: float = 0.0, *, now: float | None = None) -> bool:
        check_duration("delay_s", delay_s)
        available_at = clock(now) + delay_s
        payload = _nak_payload(delay_s if now is None else 0.0)
        return self._nats.run(
            self._settle(owner, task_id, lambda r: r.ready(available_at=available_at), payload)
        )

    def remove(self, task_id: str) -> bool:
        # A held message is acked (deleted); a waiting one is left to the next lease that meets it,
        # which drops it as stale. Not the stream's delete_msg: on nats-server 2.9 deleting a message
        # a filtered consumer has not delivered yet can leave its no-wait pulls unanswered.
        async def remove() -> bool:
            before = await self._records.change(task_id, lambda r: DELETE)
            if before is not None:
                await self._reply(before.reply, b"+ACK")
            return before is not None

        return self._nats.run(remove())

    def recover_expired(self, *, now: float | None = None) -> int:
        now = clock(now)
        return self._release(lambda r: r.state == LEASED and r.lease_until <= now)

    def release_owner(self, owner: str) -> int:
        return self._release(lambda r: r.state == LEASED and r.owner == owner)

    def _release(self, which: Callable[[Record], bool]) -> int:
        """Make the leased jobs ``which`` picks ready again (their messages go back at once)."""

        async def release_one(found: tuple[Record, int]) -> bool:
            before = await self._records.change(
                found[0].task_id, lambda r: r.ready() if which(r) else None, found
            )
            if before is not None:
                await self._reply(before.reply, b"-NAK")
            return before is not None

        async def release() -> int:
            found = [f for f in await self._records.scan() if which(f[0])]
            return sum(await asyncio.gather(*(release_one(f) for f in found)))

        return self._nats.run(release())

    def depth(self) -> dict[int, int]:
        counts = dict.fromkeys(LANES, 0)
        for record in self.records().values():
            counts[record.lane] += record.state == READY
        return counts

    def oldest_wait(self, *, now: float | None = None) -> dict[int, float]:
        now = clock(now)
        waits = dict.fromkeys(LANES, 0.0)
        for r in self.records().values():
            if r.state == READY:
                waits[r.lane] = max(waits[r.lane], now - r.enqueued_at)
        return waits
