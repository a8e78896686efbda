"""Contract tests for the JobQueue backends, then what only the embedded (SQL) backend promises.

Every contract test takes the ``backend`` fixture, parametrized over the backends: the embedded queue on
a SQLite file and on a real PostgreSQL server (a fresh database per session, dropped afterwards), and the
NATS JetStream queue (a fresh stream and KV bucket per queue, dropped afterwards). The PostgreSQL and
JetStream tests fail, never skip, when no server can be reached or started. JetStream-only behaviour
(real-time redelivery, heartbeats, publish de-duplication) is in ``tests/test_queue_jetstream.py``.

The Hypothesis state machine checks every call against a plain model of the rules (``Model``) and,
where the backend can show its stored state, that state against the model after every step.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import psycopg2
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg2.extensions import parse_dsn
from sqlalchemy import URL, Engine, create_engine, delete, event, select

from imagegenx.queue.base import JobQueue, Lease
from imagegenx.queue.embedded import EmbeddedQueue, create_table, queue_jobs
from imagegenx.queue.jetstream import JetStreamQueue
from imagegenx.storage.database import make_engine

# An admin connection (libpq DSN) to a PostgreSQL server; CI may point it at its own service.
POSTGRES_DSN = os.environ.get(
    "IMAGEGENX_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
T0 = 1_000_000.0  # the tests' clock starts here
LONG = 300.0  # a lease that does not run out during a test
LANES = (0, 1, 2, 3)


class Stored(NamedTuple):
    """One queued job as a backend stores it."""

    state: str  # "ready" | "leased"
    owner: str | None
    lease_until: float | None
    available_at: float
    deliveries: int


Snapshot = dict[str, Stored]  # task id -> stored job


@dataclass
class Backend:
    """How the contract tests reach one backend."""

    name: str
    fresh: Callable[..., JobQueue]  # fresh(aging_s=10.0): an empty queue and a client for it
    another: Callable[[], JobQueue]  # a second client of the same queue, with its own connections
    snapshot: Callable[[], Snapshot] | None = None  # stored state, where the backend can show it
    exact_order: bool = True  # the backend follows the documented order exactly


# -- PostgreSQL server --------------------------------------------------------------------------------


def _admin_connection():
    """Connect to the server, starting the local cluster once if needed; fail the test if impossible."""
    try:
        return psycopg2.connect(POSTGRES_DSN, connect_timeout=3)
    except psycopg2.OperationalError as first:
        error: Exception = first
    for version in sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True,
            timeout=60,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            return psycopg2.connect(POSTGRES_DSN, connect_timeout=3)
        except psycopg2.OperationalError as exc:
            error = exc
            time.sleep(0.5)
    pytest.fail(f"PostgreSQL is needed and could not be reached or started ({POSTGRES_DSN}): {error}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[URL]:
    """A fresh database on the PostgreSQL server for this session, dropped at the end."""
    name = f"imagegenx_queue_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_connection()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    params = parse_dsn(POSTGRES_DSN)
    yield URL.create(
        "postgresql+psycopg2",
        username=params.get("user"),
        password=params.get("password"),
        host=params.get("host"),
        port=int(params["port"]) if "port" in params else None,
        database=name,
    )
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request, tmp_path) -> str | URL:
    """Where an embedded queue's database lives: a SQLite file, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return request.getfixturevalue("postgres_url")


# -- backends -------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql", "jetstream"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "jetstream":
        yield from _jetstream_backend(request.getfixturevalue("nats_url"))
    elif request.param == "sqlite":
        yield from _embedded_backend(f"sqlite:///{tmp_path / 'queue.db'}")
    else:
        yield from _embedded_backend(request.getfixturevalue("postgres_url"))


def _embedded_backend(sql_url: str | URL) -> Iterator[Backend]:
    engines: list[Engine] = []

    def new_engine() -> Engine:
        engines.append(make_engine(sql_url))  # the engine the service runs the queue on
        return engines[-1]

    main = new_engine()
    create_table(main)

    def fresh(aging_s: float = 10.0) -> JobQueue:
        with main.begin() as conn:
            conn.execute(delete(queue_jobs))
        return EmbeddedQueue(main, aging_s=aging_s)

    def snapshot() -> Snapshot:
        c = queue_jobs.c
        columns = (c.state, c.lease_owner, c.lease_until, c.available_at, c.deliveries)
        with main.connect() as conn:
            return {row[0]: Stored(*row[1:]) for row in conn.execute(select(c.task_id, *columns))}

    yield Backend(
        name=main.dialect.name,
        fresh=fresh,
        another=lambda: EmbeddedQueue(new_engine()),
        snapshot=snapshot,
    )
    for engine in engines:
        engine.dispose()


def _jetstream_backend(url: str) -> Iterator[Backend]:
    """Each ``fresh`` queue gets its own uniquely named stream and KV bucket, dropped afterwards.

    The records keep the callers' clock (``now=``), so the contract's fake clock drives leases, nack
    delays and ``recover_expired`` exactly as for SQL; JetStream's own timers are real time, so AckWait
    is set far beyond a test's length here, and ``test_jetstream_*`` below test real-time redelivery.
    """
    clients: list[JetStreamQueue] = []
    owners: list[JetStreamQueue] = []  # the client that made each stream: it drops it

    def connect(stream: str, aging_s: float = 10.0) -> JetStreamQueue:
        clients.append(JetStreamQueue(url, stream, ack_wait_s=120.0, aging_s=aging_s, window=64))
        return clients[-1]

    def fresh(aging_s: float = 10.0) -> JobQueue:
        if owners:  # the state machine makes one per example: keep the server tidy
            owners[-1].drop()
        owners.append(connect(f"test-{uuid.uuid4().hex[:12]}", aging_s))
        return owners[-1]

    def snapshot() -> Snapshot:
        stored = owners[-1].records().items()
        return {t: Stored(r.state, r.owner, r.lease_until, r.available_at, r.deliveries) for t, r in stored}

    yield Backend(
        name="jetstream",
        fresh=fresh,
        another=lambda: connect(owners[-1].stream, owners[-1].aging_s),
        snapshot=snapshot,
    )
    if owners:
        owners[-1].drop()
    for client in clients:
        client.close()


def ids(leases: list[Lease]) -> list[str]:
    return [lease.task_id for lease in leases]


# -- contract: examples -----------------------------------------------------------------------------------


def test_submit_deduplicates_by_task_id_while_queued(backend):
    q = backend.fresh()
    assert q.submit("a", 2, "k", now=T0)
    assert not q.submit("a", 0, "other", now=T0 + 1)  # nothing about the queued job changes
    assert q.depth() == {0: 0, 1: 0, 2: 1, 3: 0}
    [lease] = q.lease("w1", 5, LONG, now=T0 + 2)
    assert (lease.lane, lease.batch_key) == (2, "k")
    assert not q.submit("a", 2, "k", now=T0 + 3)  # leased is still queued
    assert q.ack("w1", "a")
    assert q.submit("a", 2, "k", now=T0 + 4)  # once done, the id is free again


def test_lease_takes_lower_lanes_first_then_older_jobs(backend):
    q = backend.fresh()
    q.submit("p2-new", 2, "k", now=T0 + 2)
    q.submit("p2-old", 2, "k", now=T0 + 1)
    q.submit("p0", 0, "k", now=T0 + 3)
    q.submit("p1-b", 1, "k", now=T0 + 3)
    q.submit("p1-a", 1, "k", now=T0 + 3)  # same lane and time: task id decides
    leases = q.lease("w", 10, LONG, now=T0 + 4)
    assert ids(leases) == ["p0", "p1-a", "p1-b", "p2-old", "p2-new"]
    assert all(lease.delivery == 1 and lease.lease_until == T0 + 4 + LONG for lease in leases)
    assert q.lease("w", 10, LONG, now=T0 + 4) == []


def test_max_jobs_caps_a_lease(backend):
    q = backend.fresh()
    for i in range(5):
        q.submit(f"j{i}", 2, "k", now=T0 + i)
    assert ids(q.lease("w", 2, LONG, now=T0 + 9)) == ["j0", "j1"]
    assert ids(q.lease("w", 0, LONG, now=T0 + 9)) == []
    assert ids(q.lease("w", 9, LONG, now=T0 + 9)) == ["j2", "j3", "j4"]


def test_aging_lets_an_old_p3_job_beat_new_p0_work(backend):
    q = backend.fresh(aging_s=10.0)
    q.submit("old-p3", 3, "k", now=T0)
    q.submit("new-p0", 0, "k", now=T0 + 25)
    # At T0+25 and T0+29.9 the P3 job has aged two lanes (effective lane 1): the P0 job still leads.
    for now in (T0 + 25, T0 + 29.9):
        assert ids(q.lease("w", 1, 1.0, now=now)) == ["new-p0"]
        assert q.nack("w", "new-p0", now=now)
    # At T0+30 it has aged three lanes: level with P0, and older.
    assert ids(q.lease("w", 1, 1.0, now=T0 + 30)) == ["old-p3"]


def test_batch_key_filters_and_the_best_jobs_key_groups_a_lease(backend):
    q = backend.fresh()
    q.submit("a1", 2, "sd15-512", now=T0)
    q.submit("b1", 0, "sdxl-1024", now=T0 + 1)
    q.submit("a2", 1, "sd15-512", now=T0 + 2)
    q.submit("b2", 3, "sdxl-1024", now=T0 + 3)
    q.submit("a3", 2, "sd15-512", now=T0 + 4)
    # Without a key: the best job (b1, P0) decides the key, and only that key comes along.
    assert ids(q.lease("w1", 10, LONG, now=T0 + 5)) == ["b1", "b2"]
    # With a key: only that key, in order, however good other keys' jobs are.
    q.submit("b3", 0, "sdxl-1024", now=T0 + 5)
    leases = q.lease("w2", 2, LONG, batch_key="sd15-512", now=T0 + 6)
    assert ids(leases) == ["a2", "a1"]
    assert {lease.batch_key for lease in leases} == {"sd15-512"}
    assert q.lease("w2", 2, LONG, batch_key="unknown", now=T0 + 6) == []
    assert ids(q.lease("w3", 10, LONG, now=T0 + 7)) == ["b3"]


def test_an_expired_lease_is_redelivered_after_recover_expired(backend):
    q = backend.fresh()
    q.submit("a", 2, "k", now=T0)
    [first] = q.lease("dead", 1, 5.0, now=T0)
    assert (first.delivery, first.lease_until) == (1, T0 + 5.0)
    assert q.lease("live", 1, 5.0, now=T0 + 10) == []  # expired but not yet recovered: still held
    assert q.recover_expired(now=T0 + 4.9) == 0
    assert q.recover_expired(now=T0 + 5.0) == 1
    assert q.recover_expired(now=T0 + 5.0) == 0
    [second] = q.lease("live", 1, 5.0, now=T0 + 10)
    assert (second.task_id, second.delivery, second.lease_until) == ("a", 2, T0 + 15.0)
    assert not q.ack("dead", "a")  # the dead worker's late ack changes nothing
    assert q.ack("live", "a")


def test_heartbeat_extends_only_the_owners_leases(backend):
    q = backend.fresh()
    q.submit("a", 2, "k", now=T0)
    q.submit("b", 2, "k", now=T0 + 1)
    assert ids(q.lease("w1", 1, 5.0, now=T0 + 2)) == ["a"]
    assert ids(q.lease("w2", 1, 5.0, now=T0 + 2)) == ["b"]
    assert q.heartbeat("w1", ["b", "a", "missing"], 10.0, now=T0 + 4) == ["a"]
    assert q.heartbeat("w1", [], 10.0, now=T0 + 4) == []
    assert q.recover_expired(now=T0 + 8) == 1  # b's lease ran out at T0+7; a's runs to T0+14
    assert ids(q.lease("w3", 5, LONG, now=T0 + 8)) == ["b"]
    assert q.recover_expired(now=T0 + 13.9) == 0
    assert q.recover_expired(now=T0 + 14) == 1


def test_ack_and_nack_need_the_owner(backend):
    q = backend.fresh()
    q.submit("a", 1, "k", now=T0)
    assert not q.ack("w1", "a")  # not leased yet
    assert not q.nack("w1", "a", now=T0)
    q.lease("w1", 1, LONG, now=T0)
    assert not q.ack("w2", "a")
    assert not q.nack("w2", "a", now=T0)
    assert q.nack("w1", "a", 5.0, now=T0 + 1)  # back to ready, due at T0+6
    assert not q.ack("w1", "a")  # it no longer holds it
    assert q.depth()[1] == 1
    assert q.lease("w2", 1, LONG, now=T0 + 5.9) == []
    [again] = q.lease("w2", 1, LONG, now=T0 + 6)
    assert (again.task_id, again.delivery) == ("a", 2)
    assert q.ack("w2", "a")
    assert not q.ack("w2", "a")
    assert q.depth() == dict.fromkeys(LANES, 0)


def test_remove_deletes_a_job_whoever_holds_it(backend):
    q = backend.fresh()
    q.submit("ready", 2, "k", now=T0)
    q.submit("held", 2, "k", now=T0 + 1)
    assert q.remove("ready")
    assert ids(q.lease("w", 5, LONG, now=T0 + 2)) == ["held"]
    assert q.remove("held")
    assert not q.ack("w", "held")
    assert not q.remove("held")
    assert q.heartbeat("w", ["held"], LONG, now=T0 + 3) == []
    assert q.recover_expired(now=T0 + 2 * LONG) == 0
    assert q.lease("w", 5, LONG, now=T0 + 2 * LONG) == []


def test_release_owner_frees_a_previous_process_jobs(backend):
    q = backend.fresh()
    for i in range(4):
        q.submit(f"j{i}", 2, "k", now=T0 + i)
    assert ids(q.lease("old-process", 3, LONG, now=T0 + 5)) == ["j0", "j1", "j2"]
    assert ids(q.lease("other", 3, LONG, now=T0 + 5)) == ["j3"]
    assert q.release_owner("old-process") == 3
    assert q.release_owner("old-process") == 0
    leases = q.lease("new-process", 5, LONG, now=T0 + 6)
    assert [(lease.task_id, lease.delivery) for lease in leases] == [("j0", 2), ("j1", 2), ("j2", 2)]
    assert not q.ack("old-process", "j0")
    assert q.ack("other", "j3")


def test_depth_and_oldest_wait_count_ready_jobs_per_lane(backend):
    q = backend.fresh()
    assert q.depth() == {0: 0, 1: 0, 2: 0, 3: 0}
    assert q.oldest_wait(now=T0) == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    q.submit("p0", 0, "k", now=T0 + 1)
    q.submit("p2-a", 2, "k", now=T0 + 2)
    q.submit("p2-b", 2, "k", now=T0 + 4)
    q.submit("p3", 3, "k", now=T0 + 5)
    assert q.depth() == {0: 1, 1: 0, 2: 2, 3: 1}
    assert q.oldest_wait(now=T0 + 10) == {0: 9.0, 1: 0.0, 2: 8.0, 3: 5.0}
    q.lease("w", 2, LONG, now=T0 + 10)  # p0 and p2-a: leased jobs are not waiting
    assert q.depth() == {0: 0, 1: 0, 2: 1, 3: 1}
    assert q.oldest_wait(now=T0 + 10) == {0: 0.0, 1: 0.0, 2: 6.0, 3: 5.0}
    assert q.oldest_wait(now=T0)[3] == 0.0  # never negative


def test_invalid_arguments_are_refused(backend):
    q = backend.fresh()
    with pytest.raises(ValueError, match="lane"):
        q.submit("a", 4, "k", now=T0)
    with pytest.raises(ValueError, match="task_id"):
        q.submit("x" * 65, 2, "k", now=T0)
    with pytest.raises(ValueError, match="lease_s"):
        q.lease("w", 1, -1.0, now=T0)


# -- contract: concurrency --------------------------------------------------------------------------------


def test_concurrent_leasers_never_share_a_job(backend):
    """Six workers (three on the shared client, three with clients of their own) drain 150 jobs."""
    q = backend.fresh()
    rng = random.Random(7)
    total = 150
    for i in range(total):
        q.submit(f"j{i:03}", rng.randrange(4), f"key{rng.randrange(3)}", now=T0 + rng.random())
    clients = [q, q, q, backend.another(), backend.another(), backend.another()]
    start = threading.Barrier(len(clients))
    taken: list[list[Lease]] = [[] for _ in clients]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        client, local = clients[n], random.Random(n)
        try:
            start.wait()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                leases = client.lease(f"w{n}", local.randint(1, 6), LONG, now=T0 + 1)
                if leases:
                    taken[n].append(leases)
                    # A moment's work on the batch, as a worker runs one: without it one thread could
                    # lease the whole queue before the others were scheduled (seen once on SQLite).
                    time.sleep(local.random() * 0.002)
                    for lease in leases[::2]:
                        assert client.ack(f"w{n}", lease.task_id)
                elif sum(client.depth().values()) == 0:
                    return  # nothing ready: rows others hold locked are counted as ready until leased
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    leases = [lease for batches in taken for batch in batches for lease in batch]
    assert sorted(ids(leases)) == [f"j{i:03}" for i in range(total)]  # each job exactly once
    assert all(lease.delivery == 1 for lease in leases)
    assert all(len({lease.batch_key for lease in batch}) == 1 for batches in taken for batch in batches)
    assert sum(1 for batches in taken if batches) >= 2  # the workers really did overlap


# -- contract: state machine ------------------------------------------------------------------------------

OWNERS = ("w1", "w2")
KEYS = ("k1", "k2")
AGING_S = 2.0


@dataclass
class Job:
    lane: int
    key: str
    enqueued_at: float
    available_at: float
    state: str = "ready"
    owner: str | None = None
    lease_until: float | None = None
    deliveries: int = 0


class QueueMachine(RuleBasedStateMachine):
    """Random submit/lease/heartbeat/ack/nack/remove/recover/release calls against a model of the rules."""

    backend: Backend  # set by the test that runs the machine

    def __init__(self) -> None:
        super().__init__()
        self.queue = self.backend.fresh(aging_s=AGING_S)
        self.now = T0
        self.jobs: dict[str, Job] = {}  # queued jobs
        self.done: set[str] = set()  # acked or removed: must never come back
        self.most_deliveries: dict[str, int] = {}
        self.counter = 0

    # -- model helpers --

    def rank(self, task_id: str) -> tuple[int, float, str]:
        job = self.jobs[task_id]
        return job.lane - math.floor((self.now - job.enqueued_at) / AGING_S), job.enqueued_at, task_id

    def takeable(self, batch_key: str | None) -> list[str]:
        ready = [
            t
            for t, j in self.jobs.items()
            if j.state == "ready" and j.available_at <= self.now and batch_key in (None, j.key)
        ]
        return sorted(ready, key=self.rank)

    def any_id(self, data) -> str:
        return data.draw(st.sampled_from(sorted([*self.jobs, *self.done, "never-submitted"])))

    def owner_and_id(self, data) -> tuple[str, str]:
        """Half the time a held job and its owner (the interesting case), else any owner and any id."""
        held = sorted(t for t, j in self.jobs.items() if j.state == "leased")
        if held and data.draw(st.booleans()):
            task_id = data.draw(st.sampled_from(held))
            return self.jobs[task_id].owner, task_id
        return data.draw(st.sampled_from(OWNERS)), self.any_id(data)

    def held_by(self, task_id: str, owner: str) -> bool:
        job = self.jobs.get(task_id)
        return job is not None and job.state == "leased" and job.owner == owner

    def make_ready(self, task_id: str) -> None:
        job = self.jobs[task_id]
        job.state, job.owner, job.lease_until = "ready", None, None

    # -- rules --

    def add(self, lane: int, key: str) -> None:
        task_id = f"t{self.counter * 389 % 1009:04}"  # ids out of submit order: the tie-break shows
        self.counter += 1
        assert self.queue.submit(task_id, lane, key, now=self.now)
        self.jobs[task_id] = Job(lane, key, self.now, self.now)

    @initialize(
        jobs=st.lists(
            st.tuples(st.sampled_from(LANES), st.sampled_from(KEYS), st.sampled_from([0.0, 0.5, 1.5, 3.0])),
            min_size=2,
            max_size=12,
        )
    )
    def backlog(self, jobs):
        """Start with jobs submitted over a few seconds, so that leases have an order to get right."""
        for lane, key, seconds in jobs:
            self.add(lane, key)
            self.now += seconds

    @rule(jobs=st.lists(st.tuples(st.sampled_from(LANES), st.sampled_from(KEYS)), min_size=1, max_size=4))
    def submit(self, jobs):
        for lane, key in jobs:
            self.add(lane, key)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), lane=st.sampled_from(LANES), key=st.sampled_from(KEYS))
    def submit_again(self, data, lane, key):
        task_id = data.draw(st.sampled_from(sorted(self.jobs)))
        assert not self.queue.submit(task_id, lane, key, now=self.now)

    @rule(
        owner=st.sampled_from(OWNERS),
        max_jobs=st.integers(1, 3),
        lease_s=st.sampled_from([1.0, 2.5, 4.0]),
        batch_key=st.none() | st.sampled_from(KEYS),
    )
    def lease(self, owner, max_jobs, lease_s, batch_key):
        leases = self.queue.lease(owner, max_jobs, lease_s, batch_key=batch_key, now=self.now)
        candidates = self.takeable(batch_key)
        key = batch_key if batch_key is not None or not candidates else self.jobs[candidates[0]].key
        expected = [t for t in candidates if self.jobs[t].key == key][:max_jobs]
        if self.backend.exact_order:
            assert ids(leases) == expected
        else:
            assert len(leases) == len(expected) and set(ids(leases)) <= set(candidates)
        assert len({lease.batch_key for lease in leases}) <= 1  # never mixes keys
        for lease in leases:
            job = self.jobs[lease.task_id]
            assert job.state == "ready"  # nobody else holds it
            assert (lease.lane, lease.batch_key, lease.lease_until) == (job.lane, job.key, self.now + lease_s)
            assert lease.delivery == job.deliveries + 1
            job.state, job.owner, job.lease_until = "leased", owner, self.now + lease_s
            job.deliveries += 1

    @rule(data=st.data(), lease_s=st.sampled_from([1.0, 2.5]))
    def heartbeat(self, data, lease_s):
        # What a worker sends (everything it holds), plus ids it does not hold.
        owner, _ = self.owner_and_id(data)
        own = [t for t in sorted(self.jobs) if self.held_by(t, owner)]
        others = data.draw(st.lists(st.sampled_from(sorted([*self.jobs, *self.done, "x"])), max_size=2))
        task_ids = own + others
        extended = self.queue.heartbeat(owner, task_ids, lease_s, now=self.now)
        assert extended == [t for t in dict.fromkeys(task_ids) if self.held_by(t, owner)]
        for task_id in extended:
            self.jobs[task_id].lease_until = self.now + lease_s

    @rule(data=st.data())
    def ack(self, data):
        owner, task_id = self.owner_and_id(data)
        expected = self.held_by(task_id, owner)
        assert self.queue.ack(owner, task_id) == expected
        if expected:
            del self.jobs[task_id]
            self.done.add(task_id)

    @rule(data=st.data(), delay_s=st.sampled_from([0.0, 2.0]))
    def nack(self, data, delay_s):
        owner, task_id = self.owner_and_id(data)
        expected = self.held_by(task_id, owner)
        assert self.queue.nack(owner, task_id, delay_s, now=self.now) == expected
        if expected:
            self.make_ready(task_id)
            self.jobs[task_id].available_at = self.now + delay_s

    @rule(data=st.data())
    def remove(self, data):
        task_id = self.any_id(data)
        expected = task_id in self.jobs
        assert self.queue.remove(task_id) == expected
        if expected:
            del self.jobs[task_id]
            self.done.add(task_id)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 4.0, 7.0]), recover=st.booleans())
    def advance_time(self, seconds, recover):
        self.now += seconds
        if recover:
            self.recover_expired()

    @precondition(lambda self: any(j.state == "leased" for j in self.jobs.values()))
    @rule(recover=st.booleans())
    def advance_to_the_next_expiry(self, recover):
        """Time jumps to the first moment a lease has run out: the boundary must be exact."""
        self.now = max(self.now, min(j.lease_until for j in self.jobs.values() if j.state == "leased"))
        if recover:
            self.recover_expired()

    def recover_expired(self) -> None:
        expired = [t for t, j in self.jobs.items() if j.state == "leased" and j.lease_until <= self.now]
        assert self.queue.recover_expired(now=self.now) == len(expired)
        for task_id in expired:
            self.make_ready(task_id)

    @rule(owner=st.sampled_from(OWNERS))
    def release_owner(self, owner):
        held = [t for t in self.jobs if self.held_by(t, owner)]
        assert self.queue.release_owner(owner) == len(held)
        for task_id in held:
            self.make_ready(task_id)

    # -- invariants --

    @invariant()
    def depth_counts_ready_jobs(self):
        expected = dict.fromkeys(LANES, 0)
        for job in self.jobs.values():
            expected[job.lane] += job.state == "ready"
        assert self.queue.depth() == expected

    @invariant()
    def oldest_wait_follows_the_oldest_ready_job(self):
        expected = dict.fromkeys(LANES, 0.0)
        for job in self.jobs.values():
            if job.state == "ready":
                expected[job.lane] = max(expected[job.lane], self.now - job.enqueued_at)
        assert self.queue.oldest_wait(now=self.now) == expected

    @invariant()
    def stored_state_matches_the_model(self):
        """Each queued job in one place (ready, or leased by one owner); done jobs gone; deliveries grow."""
        if self.backend.snapshot is None:
            return
        stored = self.backend.snapshot()
        expected = {
            t: Stored(j.state, j.owner, j.lease_until, j.available_at, j.deliveries)
            for t, j in self.jobs.items()
        }
        assert stored == expected
        assert not self.done & stored.keys()
        for task_id, job in stored.items():
            assert job.deliveries >= self.most_deliveries.get(task_id, 0)
            self.most_deliveries[task_id] = job.deliveries


def test_queue_state_machine(backend):
    machine = type(f"QueueMachine_{backend.name}", (QueueMachine,), {"backend": backend})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=40, stateful_step_count=30, deadline=None)
    )


# -- the embedded backend ---------------------------------------------------------------------------------


def test_embedded_queue_refuses_bad_aging(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    with pytest.raises(ValueError, match="aging_s"):
        EmbeddedQueue(engine, aging_s=0.0)
    engine.dispose()


def _sqlite_engine_with_the_begin_recipe(url: str) -> Engine:
    """SQLAlchemy's documented pysqlite recipe: the driver emits no BEGIN, a ``begin`` event does."""
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")

    return engine


SQLITE_ENGINES = {
    "legacy-driver": create_engine,
    "begin-recipe": _sqlite_engine_with_the_begin_recipe,
    "task-store": make_engine,  # what the service runs on: recipe with BEGIN IMMEDIATE, WAL
}


@pytest.mark.parametrize("setup", SQLITE_ENGINES)
def test_sqlite_leases_hold_the_write_lock_however_the_engine_is_set_up(tmp_path, setup):
    """The task store owns the engine; the queue's BEGIN IMMEDIATE must work with any pysqlite setup."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    make = SQLITE_ENGINES[setup]
    engines = [make(url) for _ in range(4)]
    create_table(engines[0])
    queues = [EmbeddedQueue(e) for e in engines]
    for i in range(80):
        queues[0].submit(f"j{i:02}", i % 4, "k", now=T0)
    start = threading.Barrier(len(queues))
    taken: list[list[str]] = [[] for _ in queues]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait()
            while leases := queues[n].lease(f"w{n}", 3, LONG, now=T0):
                taken[n] += ids(leases)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(queues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(t for batch in taken for t in batch) == [f"j{i:02}" for i in range(80)]
    assert queues[1].depth() == dict.fromkeys(LANES, 0)
    for engine in engines:
        engine.dispose()


_LEASER = """
import json, sys
from imagegenx.queue.embedded import EmbeddedQueue
from imagegenx.storage.database import make_engine
url, owner = sys.argv[1], sys.argv[2]
queue = EmbeddedQueue(make_engine(url))
print("ready", flush=True)
sys.stdin.readline()
taken = []
while leases := queue.lease(owner, 4, 300.0, now=1e6):
    taken.append([lease.task_id for lease in leases])
print(json.dumps(taken), flush=True)
"""


def test_leasing_processes_never_share_a_job(sql_url):
    """Three processes, each with its own engine, drain one table at once."""
    url = sql_url if isinstance(sql_url, str) else sql_url.render_as_string(hide_password=False)
    engine = make_engine(url)
    create_table(engine)
    queue = EmbeddedQueue(engine)
    with engine.begin() as conn:
        conn.execute(delete(queue_jobs))
    for i in range(120):
        queue.submit(f"j{i:03}", i % 4, f"key{i % 3}", now=T0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LEASER, url, f"p{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    taken = [task_id for batches in results for batch in batches for task_id in batch]
    assert sorted(taken) == [f"j{i:03}" for i in range(120)]
    assert all(len({int(t[1:]) % 3 for t in batch}) == 1 for batches in results for batch in batches)
    engine.dispose()
