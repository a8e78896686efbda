"""TaskStore and migrations against real databases: SQLite files and a real PostgreSQL server.

PostgreSQL (psycopg 3): the session's database from the shared ``postgres_url`` fixture
(tests/support/services.py), emptied before each test. If the server is down the fixture tries to start
the local cluster; if it still cannot be reached the tests FAIL: CI must never skip them silently.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from imagegenx.config import StorageSettings
from imagegenx.storage import migrate
from imagegenx.storage.database import StorageUnavailable, make_engine, resolve_url, storage_errors
from imagegenx.storage.schema import metadata
from imagegenx.storage.tasks import TaskExists, TaskStore
from imagegenx.types import TaskRecord, TaskStatus, Tier
from support.services import create_database, drop_database

SECRET_RE = re.compile(r"igx_([0-9a-f]{16})_[A-Za-z0-9_-]{32}")
HEAD = "0003_tasks_user_status"

# --- databases ---------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    url = request.getfixturevalue("postgres_url").render_as_string(hide_password=False)
    migrate.upgrade(url)
    engine = make_engine(url, pooled=False)
    with engine.begin() as conn:  # a clean slate per test: tables stay, rows go
        conn.exec_driver_sql("TRUNCATE tasks, api_keys, queue_jobs")
    engine.dispose()
    return url


@pytest.fixture
def store(db_url):
    with TaskStore(db_url) as s:
        yield s


# --- helpers -----------------------------------------------------------------------------------------


def rec(task_id: str, user: str = "u1", *, created: float | None = None, **kw) -> TaskRecord:
    fields = {
        "task_type": "generate",
        "status": TaskStatus.QUEUED,
        "priority": 2,
        "params": {"prompt": f"a cat {task_id}"},
        "created_at": time.time() if created is None else created,
    }
    fields.update(kw)
    return TaskRecord(task_id=task_id, user_id=user, **fields)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- migrations --------------------------------------------------------------------------------------


def test_migrations_are_idempotent_and_match_the_tables(db_url):
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)  # second run: nothing to do, no error
    engine = make_engine(db_url, pooled=False)
    try:
        with engine.connect() as conn:
            assert migrate.current_revision(conn) == HEAD
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": False}
            )
            diff = [d for d in compare_metadata(ctx, metadata) if "queue_jobs" not in repr(d)]
            assert diff == []  # the store's Table objects and the migration agree

            insp = sa.inspect(conn)
            assert set(insp.get_table_names()) >= {"tasks", "api_keys", "queue_jobs", "alembic_version"}
            queue_cols = {c["name"]: c for c in insp.get_columns("queue_jobs")}
            assert list(queue_cols) == [
                "task_id",
                "lane",
                "batch_key",
                "state",
                "available_at",
                "lease_owner",
                "lease_until",
                "deliveries",
                "enqueued_at",
            ]
            assert queue_cols["task_id"]["type"].length == 64
            assert queue_cols["state"]["type"].length == 16
            assert queue_cols["lease_owner"]["nullable"] and queue_cols["lease_until"]["nullable"]
            assert not queue_cols["enqueued_at"]["nullable"]
            queue_indexes = {i["name"]: i["column_names"] for i in insp.get_indexes("queue_jobs")}
            assert queue_indexes["ix_queue_jobs_state_lane_available_at"] == ["state", "lane", "available_at"]
            task_indexes = {
                i["name"]: (i["column_names"], bool(i["unique"])) for i in insp.get_indexes("tasks")
            }
            assert task_indexes["ix_tasks_task_id_user_id"] == (["task_id", "user_id"], True)
            assert task_indexes["ix_tasks_user_id_created_at"] == (["user_id", "created_at"], False)
            assert task_indexes["ix_tasks_status_created_at"] == (["status", "created_at"], False)
            assert task_indexes["ix_tasks_batch_id"] == (["batch_id"], False)
            assert task_indexes["ix_tasks_created_at"] == (["created_at"], False)
        with engine.begin() as conn:  # deliveries defaults to 0 for a plain insert
            conn.exec_driver_sql(
                "INSERT INTO queue_jobs (task_id, lane, batch_key, state, available_at, enqueued_at) "
                "VALUES ('q1', 2, 'k', 'ready', 1.5, 1.5)"
            )
            assert conn.exec_driver_sql("SELECT deliveries FROM queue_jobs").scalar_one() == 0
    finally:
        engine.dispose()


def test_the_alembic_command_line_takes_plain_postgresql_urls(request):
    from alembic import command

    fresh = create_database()
    request.addfinalizer(lambda: drop_database(fresh))
    plain = fresh.set(drivername="postgresql").render_as_string(hide_password=False)
    command.upgrade(migrate.alembic_config(plain), "head")  # env.py builds its own engine here
    engine = make_engine(plain, pooled=False)
    try:
        with engine.connect() as conn:
            assert engine.dialect.driver == "psycopg"
            assert migrate.current_revision(conn) == HEAD
    finally:
        engine.dispose()


def test_a_migration_waits_for_the_write_lock_longer_than_a_request_would(tmp_path):
    """Another process holds SQLite's write lock past the 5 s a request waits (its own migration on a
    big database, or threads queued behind one): a starting migration waits for it, not fails."""
    import sqlite3

    path = tmp_path / "db.sqlite"
    migrate.upgrade(f"sqlite:///{path}")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(6.0, holder.execute, args=("COMMIT",))
    release.start()
    started = time.monotonic()
    try:
        migrate.upgrade(f"sqlite:///{path}")  # needs the write lock too, then finds the schema at head
    finally:
        release.join()
        holder.close()
    assert time.monotonic() - started >= 5.5


def test_concurrent_first_upgrades_serialize(tmp_path, request):
    """Processes starting at once on an empty database all succeed and the schema is made once; threads
    migrating different databases at once do not trip over Alembic's module-level state either.
    """
    urls = [f"sqlite:///{tmp_path / 'fresh.db'}", f"sqlite:///{tmp_path / 'other.db'}"]
    fresh = create_database()
    request.addfinalizer(lambda: drop_database(fresh))
    urls.append(fresh.render_as_string(hide_password=False))
    errors: list[BaseException] = []

    def run(url):
        try:
            migrate.upgrade(url)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(url,)) for url in urls for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for url in urls:
        with TaskStore(url, migrate=False) as s:
            s.create([rec("t1")])
            assert s.get("t1") is not None


def test_storage_unavailable_is_raised_quickly(tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing"  # plain: psycopg 3
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable):
        TaskStore(url)
    with pytest.raises(StorageUnavailable):
        migrate.upgrade(url)
    lazy = TaskStore(url, migrate=False)  # starts without a database ...
    with pytest.raises(StorageUnavailable):
        lazy.get("x")  # ... and answers 503 until there is one
    with pytest.raises(StorageUnavailable):
        lazy.create([rec("x")])
    lazy.close()
    assert time.monotonic() - t0 < 5
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(StorageUnavailable):
        TaskStore(f"sqlite:///{tmp_path / 'a_file' / 'tasks.db'}")


def test_in_memory_sqlite_works():
    with TaskStore("sqlite://") as s:
        s.create([rec("t1")])
        assert s.get("t1").task_id == "t1"


def test_sqlite_fsyncs_every_commit_unless_the_url_says_normal(tmp_path):
    def synchronous(url: str) -> int:
        engine = make_engine(url)
        with engine.connect() as conn:
            value = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        engine.dispose()
        return value

    path = tmp_path / "tasks.db"
    assert synchronous(f"sqlite:///{path}") == 2  # FULL
    assert synchronous(f"sqlite:///{path}?synchronous=normal") == 1  # NORMAL
    with TaskStore(f"sqlite:///{path}?synchronous=normal") as store:  # the same file, the option stripped
        store.create([rec("t1")])
    assert TaskStore(f"sqlite:///{path}").get("t1").task_id == "t1"
    with pytest.raises(ValueError, match="use full or normal"):
        make_engine(f"sqlite:///{path}?synchronous=off")


def test_postgres_urls_mean_psycopg_3():
    for given in ("postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"):
        assert resolve_url(given).drivername == "postgresql+psycopg"
    assert resolve_url("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg2"  # explicit stays
    assert resolve_url("sqlite:///x.db").drivername == "sqlite"


def test_postgres_pool_from_settings(postgres_url):
    plain = postgres_url.set(drivername="postgresql").render_as_string(hide_password=False)
    settings = StorageSettings(database_url=plain, db_pool_size=2, db_max_overflow=1)
    with TaskStore.from_settings(settings) as store:
        assert store.engine.dialect.driver == "psycopg"
        assert store.engine.pool.size() == 2
        held = [store.engine.connect() for _ in range(3)]  # pool_size + max_overflow at once
        assert store.engine.pool.checkedout() == 3
        for conn in held:
            conn.close()
        assert store.engine.pool.checkedin() == 2  # the overflow connection was closed, not kept
        store.create([rec("pooled")])
        assert store.get("pooled") is not None


def test_a_busy_pool_is_storage_unavailable(postgres_url):
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        with engine.connect():
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match="busy"), storage_errors():
                engine.connect()
            assert time.monotonic() - t0 < 2
    finally:
        engine.dispose()


def test_importing_storage_is_light():
    code = (
        "import sys, imagegenx.storage.tasks, imagegenx.storage.blobs, imagegenx.storage.migrate; "
        "print(sorted(m for m in ('alembic', 'torch', 'psycopg', 'psycopg2', 'imagegenx.api') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


# --- tasks -------------------------------------------------------------------------------------------


def test_create_and_get_round_trip_every_field(store):
    full = rec(
        "t-full",
        batch_id="b1",
        task_type="img2img",
        priority=1,
        params={"prompt": "猫", "nested": {"list": [1, 2.5, None, True]}},
        model="sdxl",
        width=1024,
        height=768,
        style="anime",
        progress=3,
        attempts=0,
        callback_url="https://example.com/hook",
        metadata={"seed": 7},
        results={},
    )
    store.create([full, rec("t-min", user="u2")])
    assert store.get("t-full") == full
    assert store.get("t-full", "u1") == full
    assert store.get("t-full", "u2") is None  # another user's task does not exist for them
    assert store.get("nope") is None
    minimal = store.get("t-min")
    assert minimal.status is TaskStatus.QUEUED and minimal.results == {} and minimal.metadata == {}
    assert minimal.cancel_requested is False and minimal.batch_id is None


def test_create_is_all_or_nothing(store):
    store.create([rec("a")])
    with pytest.raises(TaskExists):
        store.create([rec("b"), rec("c"), rec("a")])  # the third collides: none of the batch is stored
    assert store.get("b") is None and store.get("c") is None
    with pytest.raises(TaskExists):
        store.create([rec("d"), rec("d")])
    assert store.get("d") is None
    store.create([])
    assert store.query("u1")[1] == 1


def test_query_pagination_and_filters(store):
    base = 1_700_000_000.0
    records = [
        rec(
            f"t{i:02d}",
            created=base + i,
            style="anime" if i % 3 == 0 else "photo",
            width=512 if i % 2 else 1024,
            height=512 if i % 2 else 1024,
            status=TaskStatus.SUCCEEDED if i < 10 else TaskStatus.QUEUED,
        )
        for i in range(25)
    ]
    store.create([*records, rec("other", user="u2", created=base + 100)])

    page, total = store.query("u1", limit=10)
    assert total == 25 and [r.task_id for r in page] == [f"t{i:02d}" for i in range(24, 14, -1)]
    seen = []
    for offset in range(0, 30, 10):
        page, total = store.query("u1", limit=10, offset=offset)
        assert total == 25
        seen += [r.task_id for r in page]
    assert seen == [f"t{i:02d}" for i in range(24, -1, -1)]  # newest first, no gaps or repeats

    def ids(**kw):
        page, total = store.query("u1", limit=100, **kw)
        assert total == len(page)
        return sorted(r.task_id for r in page)

    assert ids(status=TaskStatus.SUCCEEDED) == [f"t{i:02d}" for i in range(10)]
    assert ids(status="queued") == [f"t{i:02d}" for i in range(10, 25)]
    assert len(ids(status=[TaskStatus.QUEUED, TaskStatus.SUCCEEDED])) == 25
    assert ids(style="anime") == [f"t{i:02d}" for i in range(0, 25, 3)]
    assert ids(width=512, height=512) == [f"t{i:02d}" for i in range(1, 25, 2)]
    assert ids(since=base + 20) == ["t20", "t21", "t22", "t23", "t24"]
    assert ids(since=base + 5, until=base + 8) == ["t05", "t06", "t07"]
    assert ids(style="anime", width=1024, status="queued") == ["t12", "t18", "t24"]
    assert store.query("u1", limit=0) == ([], 25)
    assert store.query("nobody") == ([], 0)
    with pytest.raises(ValueError):
        store.query("u1", limit=-1)
    with pytest.raises(ValueError):
        store.query("u1", status="bogus")


def test_active_count_and_queued_total(store):
    store.create([rec("a"), rec("b"), rec("c"), rec("d", user="u2")])
    assert store.active_count("u1") == 3 and store.queued_total() == 4
    assert store.start("a", 1)
    assert store.active_count("u1") == 3 and store.queued_total() == 3  # processing still counts
    assert store.succeed("a", 1, {}, {})
    assert store.cancel("b") is TaskStatus.CANCELED
    assert store.active_count("u1") == 1 and store.active_count("u2") == 1 and store.queued_total() == 2
    assert store.active_count("nobody") == 0


def test_lifecycle_start_progress_succeed(store):
    store.create([rec("t")])
    assert store.start("t", 1)
    t = store.get("t")
    assert t.status is TaskStatus.PROCESSING and t.attempts == 1 and t.started_at is not None
    store.set_progress("t", 40)
    assert store.get("t").progress == 40
    store.set_progress("t", 250)
    assert store.get("t").progress == 100  # clamped

    before = store.get("t")
    assert not store.succeed("t", 0, {"original": "stale"}, {})  # a stale attempt changes nothing
    assert not store.succeed("t", 2, {"original": "future"}, {})
    assert store.get("t") == before

    results = {"original": "tasks/t/original.webp", "512": "tasks/t/512.webp"}
    assert store.succeed("t", 1, results, {"seed": 42})
    done = store.get("t")
    assert done.status is TaskStatus.SUCCEEDED and done.progress == 100 and done.finished_at is not None
    assert done.results == results and done.metadata == {"seed": 42} and done.error is None

    assert not store.succeed("t", 1, {"original": "again"}, {})  # never completes twice
    assert not store.fail("t", "late failure")
    assert not store.start("t", 2)
    store.set_progress("t", 5)
    assert store.get("t") == done


def test_fencing_a_newer_attempt_wins(store):
    store.create([rec("t")])
    assert store.start("t", 1)
    assert store.start("t", 2)  # the lease expired and the job was delivered again: attempt 2 owns it
    before = store.get("t")
    assert before.attempts == 2
    assert not store.succeed("t", 1, {"original": "old"}, {})  # the old worker finishes late: refused
    assert not store.fail("t", "old worker crashed", attempt=1)
    assert store.get("t") == before
    assert store.start("t", 2)  # the same attempt may start again
    assert store.succeed("t", 2, {"original": "new"}, {})
    assert store.get("t").results == {"original": "new"}
    assert not store.succeed("t", 1, {"original": "old"}, {})


def test_only_one_of_racing_completions_wins(store):
    store.create([rec("t")])
    assert store.start("t", 3)
    outcomes: list[bool] = []
    barrier = threading.Barrier(4)

    def finish(i: int):
        barrier.wait()
        outcomes.append(store.succeed("t", 3, {"original": f"w{i}"}, {}))

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False, False, False, True]


def test_fail(store):
    store.create([rec("q"), rec("p"), rec("p2")])
    assert store.fail("q", "invalid image")  # straight from queued
    q = store.get("q")
    assert q.status is TaskStatus.FAILED and q.error == "invalid image" and q.finished_at is not None
    assert store.start("p", 1) and store.start("p2", 1)
    assert not store.fail("p", "wrong attempt", attempt=2)
    assert store.get("p").status is TaskStatus.PROCESSING
    assert store.fail("p", "CUDA out of memory", attempt=1)
    assert store.fail("p2", "no attempt given")
    assert not store.fail("p", "twice") and store.get("p").error == "CUDA out of memory"
    assert not store.fail("missing", "x")


def test_cancel(store):
    store.create([rec("q"), rec("p"), rec("d"), rec("mine", user="u2")])
    assert store.cancel("q") is TaskStatus.CANCELED
    q = store.get("q")
    assert q.status is TaskStatus.CANCELED and q.finished_at is not None
    assert not store.start("q", 1)

    assert store.start("p", 1)
    assert store.cancel("p", user_id="u1") is TaskStatus.PROCESSING
    p = store.get("p")
    assert p.status is TaskStatus.PROCESSING and p.cancel_requested
    assert not store.start("p", 2)  # a redelivery does not resume a task being canceled
    assert store.mark_canceled("p")
    assert store.get("p").status is TaskStatus.CANCELED
    assert not store.mark_canceled("p")

    assert store.start("d", 1) and store.succeed("d", 1, {}, {})
    assert store.cancel("d") is TaskStatus.SUCCEEDED  # final: unchanged
    assert store.get("d").status is TaskStatus.SUCCEEDED
    assert store.cancel("missing") is None
    assert store.cancel("mine", user_id="u1") is None  # not yours: does not exist for you
    assert store.get("mine").status is TaskStatus.QUEUED
    assert not store.mark_canceled("mine")  # only processing tasks


def test_expire_queued(store):
    now = 1_800_000_000.0
    store.create(
        [rec("old", created=now - 400), rec("new", created=now - 100), rec("busy", created=now - 400)]
    )
    assert store.start("busy", 1)
    assert store.expire_queued(300, now=now) == ["old"]
    old = store.get("old")
    assert old.status is TaskStatus.EXPIRED and old.finished_at == now and "expired" in old.error
    assert store.get("new").status is TaskStatus.QUEUED and store.get("busy").status is TaskStatus.PROCESSING
    assert store.expire_queued(300, now=now) == []
    assert sorted(store.expire_queued(50, now=now)) == ["new"]
    assert store.queued_total() == 0
    # without ``now`` the wall clock is used: fresh tasks are not expired
    store.create([rec("fresh")])
    assert store.expire_queued(300) == []


def test_purge_before(store):
    day = 86_400.0
    now = 1_800_000_000.0
    store.create(
        [
            rec("old-done", created=now - 100 * day),
            rec("old-failed", created=now - 95 * day),
            rec("old-queued", created=now - 100 * day),
            rec("recent-done", created=now - 10 * day),
        ]
    )
    for task_id in ("old-done", "recent-done"):
        assert store.start(task_id, 1)
        assert store.succeed(task_id, 1, {"original": f"tasks/{task_id}/original.webp"}, {})
    assert store.fail("old-failed", "boom")

    purged = store.purge_before(now - 90 * day, limit=1)
    assert [r.task_id for r in purged] == ["old-done"]  # oldest first, bounded
    assert purged[0].results == {"original": "tasks/old-done/original.webp"}  # enough to delete blobs
    assert [r.task_id for r in store.purge_before(now - 90 * day)] == ["old-failed"]
    assert store.purge_before(now - 90 * day) == []
    assert store.get("old-done") is None and store.get("old-failed") is None
    assert store.get("old-queued") is not None  # not final: kept
    assert store.get("recent-done") is not None


def test_concurrent_writers_do_not_fail(store):
    """Many threads writing at once: SQLite waits on its lock instead of raising 'database is locked'."""
    store.create([rec(f"t{i}") for i in range(40)])
    errors: list[BaseException] = []

    def work(ids: list[str]):
        try:
            for task_id in ids:
                assert store.start(task_id, 1)
                store.set_progress(task_id, 50)
                assert store.succeed(task_id, 1, {"original": task_id}, {})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=([f"t{i}" for i in range(k, 40, 4)],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.query("u1", status="succeeded", limit=0)[1] == 40


def test_sqlite_write_transactions_are_serialized(tmp_path):
    """On SQLite every engine.begin() is BEGIN IMMEDIATE: read-then-write transactions (the queue's
    lease) never interleave, so no update is lost and none fails with SQLITE_BUSY halfway.
    """
    with TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}") as s:
        s.create([rec("counter", priority=0)])
        errors: list[BaseException] = []

        def bump():
            try:
                for _ in range(15):
                    with s.engine.begin() as conn:
                        value = conn.execute(sa.text("SELECT priority FROM tasks")).scalar_one()
                        time.sleep(0.0005)
                        conn.execute(sa.text("UPDATE tasks SET priority = :v"), {"v": value + 1})
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert s.get("counter").priority == 60


# --- API keys ----------------------------------------------------------------------------------------


def _database_bytes(store: TaskStore, db_url: str) -> bytes:
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database)
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))  # db, -wal, -shm
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT t::text FROM api_keys t").scalars().all()
    return "\n".join(rows).encode()


def test_api_keys(store, db_url):
    key, secret = store.create_key("ci bot", Tier.PAID, 2.5, 50)
    match = SECRET_RE.fullmatch(secret)
    assert match and match.group(1) == key.key_id
    assert key.tier is Tier.PAID and key.rate_limit_per_s == 2.5 and key.queue_quota == 50
    assert key.revoked_at is None
    other, other_secret = store.create_key("free user", Tier.FREE, 1.0, 5)
    assert other_secret != secret and other.key_id != key.key_id

    assert store.verify_key(secret) == key
    assert store.verify_key(other_secret) == other
    assert store.verify_key(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.verify_key("") is None and store.verify_key("igx_nope") is None

    stored = _database_bytes(store, db_url)
    random_part = secret.split("_", 2)[2].encode()
    assert secret.encode() not in stored and random_part not in stored  # the secret is never stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored  # only its hash

    assert [k.key_id for k in store.list_keys()] == [key.key_id, other.key_id]
    assert store.revoke_key(key.key_id)
    assert store.verify_key(secret) is None
    assert not store.revoke_key(key.key_id) and not store.revoke_key("missing")
    listed = {k.key_id: k for k in store.list_keys()}
    assert listed[key.key_id].revoked_at is not None and listed[other.key_id].revoked_at is None
    assert store.verify_key(other_secret) == other


def test_the_per_request_active_count_reads_the_keys_unfinished_tasks_only(tmp_path):
    """Each accepted request counts its key's unfinished tasks: an index on (user_id, status), not a
    walk through the key's whole history."""
    with TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}") as store, store.engine.connect() as conn:
        query = "SELECT count(*) FROM tasks WHERE user_id = 'u' AND status IN ('queued', 'processing')"
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}").all()
    assert any("ix_tasks_user_id_status" in str(row) for row in plan), plan
