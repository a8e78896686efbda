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
contract's order (effective lane ``lane - floor(wait / aging_s)``, then enqueue time, then task id),
keeps up to ``max_jobs`` of the best job's batch key and naks the rest at once, before returning. Those
naks do not count as deliveries: the delivery count is the record's own, raised only when a lease takes
the job (JetStream's ``num_delivered`` also counts these looks, so it would trip the cap early). So no
per-key subjects or consumers are needed; the price is that a lease touches up to ``4 * window`` messages
and that a batch-key top-up only sees each lane's first ``window`` jobs. The JetStream consumers have no
``max_deliver``: the engine fails a job whose ``Lease.delivery`` is over its cap.

Clocks: records keep the caller's times (``now=``), so leases, nack delays and ``recover_expired`` follow
the caller's clock exactly, as the contract tests need. JetStream's own timers (``AckWait``, nak delays)
are real time: nak delays are sent only when the caller uses the real clock (``now`` omitted), since a
caller's fake time cannot be mapped onto the server's; the record's ``available_at`` decides either way.
A lease that finds a message JetStream redelivered (``AckWait`` passed) takes it when the record's lease
has run out too, and otherwise gives it back until then: keep ``AckWait`` equal to the lease time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import replace

from imagegenx.queue.base import LANES, JobQueue, Lease, check_duration, check_id, clock
from imagegenx.queue.jetstream_records import DELETE, LEASED, NAME, READY, Record, RecordStore
from imagegenx.queue.natsloop import NatsThread, pull_now

log = logging.getLogger(__name__)

TASK_HEADER = "Imagegenx-Task"
TOKEN_HEADER = "Imagegenx-Token"


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
            try:
                await self._js.add_consumer(self.stream, consumer)
            except BadRequestError as exc:
                info = await self._js.consumer_info(self.stream, f"P{lane}")
                raise ValueError(
                    f"JetStream consumer {self.stream}/P{lane} exists with AckWait "
                    f"{info.config.ack_wait}s, not {self._ack_wait_s}s: delete it or use that lease time"
                ) from exc
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

        headers = {
            "Nats-Msg-Id": f"{record.task_id}:{record.token}",
            TASK_HEADER: record.task_id,
            TOKEN_HEADER: record.token,
        }
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
        window = max(self._window, max_jobs)
        pulled = await asyncio.gather(
            *(pull_now(self._nats.nc, self.stream, f"P{lane}", window, self._timeout_s) for lane in LANES)
        )
        messages = [m for lane in pulled for m in lane]
        found = await asyncio.gather(*(self._records.get(m.headers[TASK_HEADER]) for m in messages))
        stale, back, ready = [], [], []  # back: (message, seconds until it may be taken)
        for msg, hit in zip(messages, found, strict=True):
            if hit is None or hit[0].token != msg.headers.get(TOKEN_HEADER):
                stale.append(msg)  # acked or removed (and maybe submitted again) meanwhile
                continue
            record = hit[0]
            # A leased record's message only comes back when JetStream redelivered it (AckWait passed):
            # takeable once the record's lease has run out too.
            due = record.lease_until if record.state == LEASED else record.available_at
            if due > now:
                back.append((msg, due - now))
            else:
                ready.append((msg, hit))
        ready.sort(key=lambda item: self._rank(item[1][0], now))
        if batch_key is None and ready:
            batch_key = ready[0][1][0].batch_key
        chosen = [item for item in ready if item[1][0].batch_key == batch_key][:max_jobs]
        picked = {id(msg) for msg, _ in chosen}
        back += [(msg, 0.0) for msg, _ in ready if id(msg) not in picked]
        until = now + lease_s

        def take(msg) -> Callable[[Record], Record | None]:
            def change(r: Record) -> Record | None:
                if r.token != msg.headers[TOKEN_HEADER] or (r.state == LEASED and r.lease_until > now):
                    return None
                return replace(
                    r,
                    state=LEASED,
                    owner=owner,
                    lease_until=until,
                    deliveries=r.deliveries + 1,
                    reply=msg.reply,
                )

            return change

        taken = await asyncio.gather(
            *(self._records.change(r.task_id, take(m), (r, rev)) for m, (r, rev) in chosen)
        )
        leases = []
        for (msg, _), before in zip(chosen, taken, strict=True):
            if before is None:
                back.append((msg, 0.0))  # changed meanwhile (removed: the next lease drops it)
            else:
                leases.append(
                    Lease(before.task_id, before.lane, before.batch_key, before.deliveries + 1, until)
                )
        back.sort(key=lambda item: item[0].metadata.sequence.stream)  # keep the stream's order
        await asyncio.gather(
            *(self._reply(m.reply, b"+ACK") for m in stale),
            *(self._reply(m.reply, _nak_payload(delay if real else 0.0)) for m, delay in back),
        )
        return leases

    def _rank(self, record: Record, now: float) -> tuple[int, float, str]:
        wait = max(0.0, now - record.enqueued_at)
        return record.lane - math.floor(wait / self.aging_s), record.enqueued_at, record.task_id

    async def _settle(self, owner: str, task_id: str, change: Callable, payload: bytes) -> bool:
        """``change`` the record of a job ``owner`` holds, then send ``payload`` to its message."""
        before = await self._records.change(
            task_id, lambda r: change(r) if r.state == LEASED and r.owner == owner else None
        )
        if before is not None:
            await self._reply(before.reply, payload)
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
        # The record goes first, so the id is free even if the ack is lost (the message is then stale).
        return self._nats.run(self._settle(owner, task_id, lambda r: DELETE, b"+ACK"))

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
