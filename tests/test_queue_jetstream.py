"""What only the JetStream queue does: real-time redelivery, heartbeats, the delivery count, publish
de-duplication; the cancel bus; the backend factory. The JobQueue contract itself runs against
JetStream in tests/test_queue.py. A real NATS server is used (started when down: support/nats_server)."""

from __future__ import annotations

import asyncio
import queue as stdlib_queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import nats
import pytest
from sqlalchemy import create_engine

from imagegenx.config import QueueSettings
from imagegenx.queue.cancel import CancelBus, LocalCancelBus, NatsCancelBus
from imagegenx.queue.embedded import EmbeddedQueue
from imagegenx.queue.factory import open_cancel_bus, open_queue
from imagegenx.queue.jetstream import JetStreamQueue, message_headers

T0 = 1_000_000.0


@pytest.fixture
def stream() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fast(nats_url, stream) -> Iterator[JetStreamQueue]:
    """A queue whose AckWait is one second: JetStream's own redelivery within a test."""
    q = JetStreamQueue(nats_url, stream, ack_wait_s=1.0)
    yield q
    q.drop()
    q.close()


def _lease_within(q: JetStreamQueue, owner: str, n: int, seconds: float):
    """Lease on the real clock until ``n`` jobs came or ``seconds`` passed."""
    leases, deadline = [], time.monotonic() + seconds
    while len(leases) < n and time.monotonic() < deadline:
        leases += q.lease(owner, n - len(leases), 1.0)
        time.sleep(0.05)
    return leases


_DOOMED = """
import sys
from imagegenx.queue.jetstream import JetStreamQueue
q = JetStreamQueue(sys.argv[1], sys.argv[2], ack_wait_s=1.0)
print(",".join(sorted(lease.task_id for lease in q.lease("doomed", 5, 1.0))), flush=True)
sys.stdin.readline()  # holds its jobs until it is killed
"""


def test_jetstream_a_killed_worker_jobs_are_redelivered_with_delivery_2(fast, nats_url, stream):
    fast.submit("a", 1, "k")
    fast.submit("b", 1, "k")
    worker = subprocess.Popen(
        [sys.executable, "-c", _DOOMED, nats_url, stream],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout.readline().strip() == "a,b"
    finally:
        worker.kill()  # SIGKILL: no ack, no nack, no goodbye
        worker.wait(timeout=10)
    assert fast.lease("live", 5, 1.0) == []  # AckWait has not passed: still held
    leases = _lease_within(fast, "live", 2, 10.0)  # nobody calls recover_expired: JetStream redelivers
    assert sorted((lease.task_id, lease.delivery) for lease in leases) == [("a", 2), ("b", 2)]
    assert not fast.ack("doomed", "a")
    assert fast.ack("live", "a") and fast.ack("live", "b")
    assert fast.depth() == {0: 0, 1: 0, 2: 0, 3: 0} and fast.records() == {}


def test_jetstream_heartbeats_hold_a_job_past_ack_wait(fast, nats_url, stream):
    other = JetStreamQueue(nats_url, stream, ack_wait_s=1.0)
    try:
        fast.submit("a", 2, "k")
        assert [x.task_id for x in fast.lease("w1", 1, 1.0)] == ["a"]
        for _ in range(6):  # 1.8 s, almost twice AckWait, heartbeating every 0.3 s
            time.sleep(0.3)
            assert fast.heartbeat("w1", ["a"], 1.0) == ["a"]
            assert other.lease("w2", 1, 1.0) == []
        again = _lease_within(other, "w2", 1, 10.0)  # heartbeats stopped: it comes back
        assert [(x.task_id, x.delivery) for x in again] == [("a", 2)]
        assert not fast.ack("w1", "a") and other.ack("w2", "a")
    finally:
        other.close()


def test_jetstream_delivery_counts_leases_not_looks(nats_url, stream):
    """A lease that passes over another key's job (nak) does not count against that job's cap."""
    q = JetStreamQueue(nats_url, stream, ack_wait_s=60.0)
    try:
        q.submit("poison", 0, "k1", now=T0)
        q.submit("other", 1, "k2", now=T0)
        deliveries = []
        for _ in range(4):  # the engine fails a job once delivery > ServiceSettings.max_deliveries (3)
            for _ in range(3):  # looks at "poison" and puts it back each time
                assert [x.task_id for x in q.lease("w", 5, 30.0, batch_key="k2", now=T0)] == ["other"]
                assert q.nack("w", "other", now=T0)
            [lease] = q.lease("w", 5, 30.0, batch_key="k1", now=T0)
            deliveries.append(lease.delivery)
            assert q.nack("w", "poison", now=T0)
        assert deliveries == [1, 2, 3, 4]
        assert q.records()["other"].deliveries == 12
    finally:
        q.drop()
        q.close()


def test_jetstream_a_retried_publish_is_stored_once(nats_url, stream):
    """A publish whose PubAck was lost is sent again with the same Nats-Msg-Id: JetStream keeps one."""
    q = JetStreamQueue(nats_url, stream)
    try:
        assert q.submit("a", 2, "k", now=T0)
        headers = message_headers(q.records()["a"])  # what the submit's publish sent

        async def publish_again():
            nc = await nats.connect(nats_url)
            js = nc.jetstream()
            ack = await js.publish(f"{stream}.jobs.2", b"", headers=headers)
            info = await js.stream_info(stream)
            await nc.close()
            return ack, info.state.messages

        ack, messages = asyncio.run(publish_again())
        assert ack.duplicate and messages == 1
        assert [x.task_id for x in q.lease("w", 5, 30.0, now=T0)] == ["a"]
        assert q.lease("w", 5, 30.0, now=T0) == []
    finally:
        q.drop()
        q.close()


def test_jetstream_refuses_bad_settings(nats_url):
    with pytest.raises(ValueError, match="stream name"):
        JetStreamQueue(nats_url, "has.dots")
    with pytest.raises(ValueError, match="aging_s"):
        JetStreamQueue(nats_url, "ok", aging_s=0.0)
    with pytest.raises(ValueError, match="nats://"):
        JetStreamQueue("http://127.0.0.1:4222", "ok")
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1"):
        JetStreamQueue("nats://127.0.0.1:1", "ok", timeout_s=1.0)


# -- cancel bus ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "nats"])
def test_cancel_bus_reaches_every_subscriber(kind, nats_url, stream):
    buses: list[CancelBus] = (
        [LocalCancelBus()] * 3 if kind == "local" else [NatsCancelBus(nats_url, stream) for _ in range(3)]
    )
    api, worker1, worker2 = buses
    heard1, heard2 = stdlib_queue.Queue(), stdlib_queue.Queue()
    try:
        stop1 = worker1.subscribe(heard1.put)
        worker2.subscribe(heard2.put)
        worker2.subscribe(lambda task_id: 1 / 0)  # a failing subscriber does not stop the others
        api.publish("t1")
        assert heard1.get(timeout=5) == "t1" and heard2.get(timeout=5) == "t1"
        stop1()
        stop1()  # twice is harmless
        api.publish("t2")
        assert heard2.get(timeout=5) == "t2"
        time.sleep(0.2)
        assert heard1.empty()
    finally:
        for bus in set(buses):
            bus.close()


# -- factory -----------------------------------------------------------------------------------------


def test_open_queue_and_cancel_bus_follow_the_settings(nats_url, stream, tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    assert isinstance(open_queue(QueueSettings(), engine), EmbeddedQueue)
    assert isinstance(open_cancel_bus(QueueSettings()), LocalCancelBus)
    with pytest.raises(ValueError, match="engine"):
        open_queue(QueueSettings(), None)
    settings = QueueSettings(url=nats_url, stream=stream)
    q = open_queue(settings, None, lease_s=7.0)
    bus = open_cancel_bus(settings)
    try:
        assert isinstance(q, JetStreamQueue) and isinstance(bus, NatsCancelBus)
        assert bus.subject == f"{stream}.cancel"

        async def ack_wait():
            nc = await nats.connect(nats_url)
            info = await nc.jetstream().consumer_info(stream, "P0")
            await nc.close()
            return info.config.ack_wait

        assert asyncio.run(ack_wait()) == 7.0
    finally:
        q.drop()
        q.close()
        bus.close()
        engine.dispose()
