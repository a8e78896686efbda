"""The service path's database cost: how many write transactions one task takes, and what a kill -9
inside the merged ones (task row + queue row, success + ack) leaves behind."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import event

from conftest import make_settings
from imagegenx.api.app import create_app
from imagegenx.config import StorageSettings
from imagegenx.engine.groupcommit import GroupCommit
from imagegenx.engine.service import Service, TaskInput
from imagegenx.engine.worker import PROGRESS_FLUSH_S
from imagegenx.queue.embedded import EmbeddedQueue
from imagegenx.storage.blobs import BlobStore
from imagegenx.storage.database import StorageUnavailable
from imagegenx.storage.tasks import Completion, TaskExists, TaskStore
from imagegenx.types import ApiKey, TaskStatus, Tier

MODEL = "random:tiny-sd21"
ONE_STEP = {"width": 64, "height": 64, "steps": 1, "cfg_scale": 0, "sampler": "euler"}
WRITES = ("INSERT", "UPDATE", "DELETE")
USER = ApiKey("k1", "test", Tier.PAID, rate_limit_per_s=0, queue_quota=1000, created_at=0)
PARAMS = {"prompt": "a fox", "model": MODEL, "width": 64, "height": 64, "steps": 1}


class WriteLog:
    """Every committed transaction on an engine that changed rows, as the (verb, table) pairs it ran.

    Statements that change nothing (the worker's periodic expiry and recovery sweeps) do not count:
    they take the lock for a moment but write no page and sync nothing.
    """

    def __init__(self, engine) -> None:
        self.transactions: list[list[tuple[str, str]]] = []
        self._open: dict[int, list[tuple[str, str]]] = {}
        self._lock = threading.Lock()
        event.listen(engine, "after_cursor_execute", self._executed)
        event.listen(engine, "commit", self._commit)
        event.listen(engine, "rollback", lambda conn: self._open.pop(id(conn), None))

    def _executed(self, conn, cursor, statement, parameters, context, executemany) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in WRITES and cursor.rowcount:
            table = statement.split("INTO " if verb == "INSERT" else "FROM " if verb == "DELETE" else " ", 2)
            name = table[1].split()[0] if verb != "UPDATE" else statement.split()[1]
            self._open.setdefault(id(conn), []).append((verb, name.strip('"')))

    def _commit(self, conn) -> None:
        writes = self._open.pop(id(conn), None)
        if writes:
            with self._lock:
                self.transactions.append(writes)

    def take(self) -> list[list[tuple[str, str]]]:
        with self._lock:
            taken, self.transactions = self.transactions, []
        return taken


def _settings(tmp_path: Path, **engine):
    settings = make_settings(tmp_path, **engine)
    storage = StorageSettings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        blob_url=str(tmp_path),
        spool_dir=tmp_path / "spool",
    )
    models = settings.models.model_copy(update={"default_model": MODEL})
    return settings.model_copy(update={"storage": storage, "models": models})


def _ready(app) -> tuple[WriteLog, str]:
    """Wait for the warm-up, give the client a key, then start logging the database's writes."""
    ctx = app.state.ctx
    assert ctx.ready.wait(120)
    _, secret = ctx.service.store.create_key("test", Tier.PAID, rate_limit_per_s=0, queue_quota=1000)
    return WriteLog(ctx.service.store.engine), secret


def _wait(client: TestClient, task_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/api/v1/image/task/{task_id}").json()["data"]
        if view["status"] in ("succeeded", "failed", "canceled", "expired"):
            return view
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} not final after {timeout} s")


def test_a_one_step_task_takes_three_or_four_write_transactions_through_the_http_api(tmp_path):
    """Accept (task + queue row), lease, then success + ack: three commits. The start is a fourth
    only when the loop writes it before the job finishes; otherwise it folds into the success."""
    app = create_app(_settings(tmp_path), run_worker=True)
    with TestClient(app) as client:
        log, client.headers["X-API-Key"] = _ready(app)
        accept = [("INSERT", "tasks"), ("INSERT", "queue_jobs")]
        lease = [("UPDATE", "queue_jobs")]
        start = [("UPDATE", "tasks")]
        finish = [("UPDATE", "tasks"), ("DELETE", "queue_jobs")]
        for seed in range(3):
            response = client.post("/api/v1/image/generate", json={"text": "a fox", "seed": seed, **ONE_STEP})
            assert response.status_code == 200, response.text
            view = _wait(client, response.json()["data"]["task_ids"][0])
            assert view["status"] == "succeeded" and view["attempts"] == 1 and view["progress"] == 100
            time.sleep(0.2)  # the acknowledgement is in the success's commit: nothing may follow it
            writes = log.take()
            assert writes in ([accept, lease, start, finish], [accept, lease, start + finish]), writes
        # A 64² WebP original is its own thumbnail: stored under each name, encoded once.
        blobs = {v: client.get(url).content for v, url in view["urls"].items()}
        assert blobs["original"] == blobs["512"] == blobs["256"] and blobs["original"][8:12] == b"WEBP"


def test_a_thumbnail_smaller_than_the_image_is_encoded_on_its_own(tmp_path):
    app = create_app(_settings(tmp_path), run_worker=True)
    with TestClient(app) as client:
        _, client.headers["X-API-Key"] = _ready(app)
        body = {"text": "a fox", **ONE_STEP, "width": 320, "height": 320}
        view = _wait(client, client.post("/api/v1/image/generate", json=body).json()["data"]["task_ids"][0])
        blobs = {v: client.get(url).content for v, url in view["urls"].items()}
        assert blobs["512"] == blobs["original"] != blobs["256"]
        assert Image.open(io.BytesIO(blobs["256"])).size == (256, 256)


def test_progress_of_running_jobs_is_written_together_at_most_every_flush_interval(tmp_path):
    app = create_app(_settings(tmp_path, max_batch=4, batch_window_ms=1000), run_worker=True)
    with TestClient(app) as client:
        log, client.headers["X-API-Key"] = _ready(app)
        started = time.monotonic()
        # Long enough (about 2 s here) for several progress flushes, however fast the machine is idle
        body = {"text": "a fox", **ONE_STEP, "steps": 150, "width": 192, "height": 192}
        tasks = [client.post("/api/v1/image/generate", json=body | {"seed": i}).json() for i in range(3)]
        task_ids = [t["data"]["task_ids"][0] for t in tasks]
        seen = set()  # the database shows progress while the jobs run
        while (view := client.get(f"/api/v1/image/task/{task_ids[0]}").json()["data"])[
            "status"
        ] != "succeeded":
            seen.add(view["progress"])
            time.sleep(0.05)
        views = [_wait(client, t) for t in task_ids]
        seconds = time.monotonic() - started
        assert [v["status"] for v in views] == ["succeeded"] * 3
        assert any(0 < p < 100 for p in seen), seen
        updates_only = [t for t in log.take() if {verb for verb, _ in t} == {"UPDATE"} and t[0][1] == "tasks"]
        # the batch's start, then progress flushes: one transaction each for all three jobs
        assert len(updates_only) <= 2 + seconds / PROGRESS_FLUSH_S, (len(updates_only), seconds)
        assert max(len(t) for t in updates_only) == 3, updates_only


# -- kill -9 inside a merged transaction ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import event
    from imagegenx.engine.service import TaskInput
    from imagegenx.storage.tasks import Completion
    from test_service_path import PARAMS, USER, _service

    service = _service(sys.argv[1], sys.argv[2])

    @event.listens_for(service.store.engine, "commit")
    def hang(conn):  # every statement has run; the commit has not: die here
        print("committing", flush=True)
        time.sleep(600)

    if sys.argv[3] == "submit":
        service.submit(USER, [TaskInput(dict(PARAMS))])
    else:
        service.complete("w1", [Completion(sys.argv[3], 1, {"original": "x"}, {})])
    """
)


def _service(database_url: str, root: str) -> Service:
    """A service on the embedded queue, its blobs and settings under ``root`` (no engine: no GPU side)."""
    store = TaskStore(database_url)
    blobs = BlobStore(str(Path(root) / "blobs"), Path(root) / "spool")
    return Service(make_settings(Path(root)), store, EmbeddedQueue(store.engine), blobs)


def _kill_inside_commit(tmp_path: Path, database_url: str, what: str) -> None:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, database_url, str(tmp_path), what],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "committing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


def test_kill9_inside_the_accepting_commit_leaves_neither_row(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    _kill_inside_commit(tmp_path, url, "submit")  # the client never got its 2xx
    service = _service(url, str(tmp_path))
    assert service.store.query("k1") == ([], 0)
    assert service.queue.depth() == {0: 0, 1: 0, 2: 0, 3: 0}
    (record,) = service.submit(USER, [TaskInput(dict(PARAMS))])  # the retry
    assert [lease.task_id for lease in service.queue.lease("w1", 5, 30)] == [record.task_id]


def test_kill9_inside_the_finishing_commit_loses_no_job(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    service = _service(url, str(tmp_path))
    (record,) = service.submit(USER, [TaskInput(dict(PARAMS))])
    assert [lease.task_id for lease in service.queue.lease("w1", 5, 30)] == [record.task_id]
    assert service.store.start(record.task_id, 1)
    _kill_inside_commit(tmp_path, url, record.task_id)
    # Neither the success nor the ack happened: the task still runs, its lease is still held, and
    # the restarted worker's release_owner hands it out again.
    assert service.store.get(record.task_id).status is TaskStatus.PROCESSING
    assert service.queue.release_owner("w1") == 1
    (again,) = service.queue.lease("w2", 5, 30)
    assert again.task_id == record.task_id and again.delivery == 2
    assert service.store.start(record.task_id, 2)
    assert service.complete("w2", [Completion(record.task_id, 2, {"original": "x"}, {})]) == {record.task_id}
    assert service.store.get(record.task_id).status is TaskStatus.SUCCEEDED
    assert service.queue.ack("w2", record.task_id) is False  # already acked in the same commit


def test_complete_folds_a_start_and_honours_a_cancel_request(tmp_path):
    service = _service(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path))
    first, second = service.submit(USER, [TaskInput(PARAMS | {"seed": i}) for i in range(2)])
    service.queue.lease("w1", 5, 30)
    service.store.start(second.task_id, 1)
    service.store.cancel(second.task_id)  # running: only a request; then redelivered as attempt 2
    done = service.complete(
        "w1", [Completion(first.task_id, 1, start=True), Completion(second.task_id, 2, start=True)]
    )
    assert done == {first.task_id}
    assert service.store.get(first.task_id).status is TaskStatus.SUCCEEDED
    assert service.store.get(second.task_id).status is TaskStatus.CANCELED
    assert service.queue.depth() == {0: 0, 1: 0, 2: 0, 3: 0} and not service.queue.lease("w1", 5, 30)


def test_a_queue_on_another_database_is_not_joined(tmp_path):
    store = TaskStore(f"sqlite:///{tmp_path / 'a.sqlite'}")
    other = TaskStore(f"sqlite:///{tmp_path / 'b.sqlite'}")
    service = Service(
        make_settings(tmp_path),
        store,
        EmbeddedQueue(other.engine),
        BlobStore(str(tmp_path), tmp_path / "spool"),
    )
    assert service.joint_queue() is None
    (record,) = service.submit(USER, [TaskInput(dict(PARAMS))])
    (lease,) = service.queue.lease("w1", 5, 30)
    assert lease.task_id == record.task_id
    service.store.start(record.task_id, 1)
    assert service.complete("w1", [Completion(record.task_id, 1)]) == {record.task_id}
    assert not service.queue.ack("w1", record.task_id)  # acked by complete


# -- group commit ---------------------------------------------------------------------------------------


def _callers(group: GroupCommit, items: list) -> dict:
    """Run ``group.run(item)`` for each item in its own thread, all at once; returns item -> error."""
    errors: dict = {}
    barrier = threading.Barrier(len(items))

    def call(item) -> None:
        barrier.wait()
        try:
            group.run(item)
        except Exception as error:
            errors[item] = error

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


def test_group_commit_returns_each_caller_after_its_own_commit_and_shares_commits():
    committed: list[list[int]] = []
    returned_after_commit = []

    def commit(items: list[int]) -> None:
        time.sleep(0.02)  # as an fsync: callers arriving meanwhile pile up for the next group
        committed.append(list(items))

    group = GroupCommit(commit)
    original_run = group.run

    def run(item: int) -> None:
        original_run(item)
        returned_after_commit.append(any(item in c for c in committed))

    group.run = run
    assert _callers(group, list(range(32))) == {}
    assert sorted(i for c in committed for i in c) == list(range(32))  # each once
    assert len(committed) < 32 and all(returned_after_commit) and len(returned_after_commit) == 32


def test_group_commit_isolates_a_duplicate_and_shares_other_errors():
    groups: list[list[str]] = []

    def commit(items: list[str]) -> None:
        groups.append(list(items))
        time.sleep(0.01)
        if "dup" in items:
            raise TaskExists("duplicate")
        if "down" in items:
            raise StorageUnavailable("database away")

    errors = _callers(GroupCommit(commit), ["a", "b", "dup", "c", "d"])
    assert set(errors) == {"dup"} and isinstance(errors["dup"], TaskExists)
    groups.clear()
    errors = _callers(GroupCommit(commit), ["down", *"vwxyz"])
    failed = {item for group in groups if "down" in group for item in group}
    assert set(errors) == failed and all(isinstance(e, StorageUnavailable) for e in errors.values())


# -- reads that spare the write lock ----------------------------------------------------------------------


def test_an_idle_lease_takes_no_write_lock_and_load_is_one_read(tmp_path):
    service = _service(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path))
    statements: list[str] = []
    event.listen(service.store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert service.queue.lease("w1", 8, 30) == []
    assert not any("IMMEDIATE" in s for s in statements), statements
    assert service.store.load(USER.key_id) == (0, 0, None)
    (record,) = service.submit(USER, [TaskInput(dict(PARAMS))])
    other = ApiKey("k2", "other", Tier.PAID, rate_limit_per_s=0, queue_quota=10, created_at=0)
    service.submit(other, [TaskInput(dict(PARAMS))])
    assert service.store.load(USER.key_id)[:2] == (2, 1)
    assert service.store.load(USER.key_id).oldest_queued_at == record.created_at
    statements.clear()
    (lease,) = service.queue.lease("w1", 1, 30)  # work is there: the lease takes the lock and the job
    assert lease.task_id == record.task_id and any("IMMEDIATE" in s for s in statements)
    service.store.start(record.task_id, 1)
    assert service.store.load(USER.key_id)[:2] == (1, 1)  # processing still counts against the quota


def test_new_tasks_are_refused_while_the_queue_is_further_behind_than_the_limit(tmp_path, monkeypatch):
    """max_queue_wait_s: a 503 with the reason while the oldest queued task has waited longer; the
    tasks already accepted stay queued, and work is taken again once the queue catches up."""
    from imagegenx.engine import service as service_module
    from imagegenx.engine.service import ServiceBusy

    service = _service(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path))
    limits = service.settings.service.model_copy(update={"max_queue_wait_s": 2.0})
    service.settings = service.settings.model_copy(update={"service": limits})
    now = [1_000_000.0]
    monkeypatch.setattr(service_module.time, "time", lambda: now[0])
    (first,) = service.submit(USER, [TaskInput(dict(PARAMS))])
    now[0] += 1.5  # the oldest has waited 1.5 s: still accepted
    (second,) = service.submit(USER, [TaskInput(dict(PARAMS))])
    now[0] += 1.0  # 2.5 s behind
    with pytest.raises(ServiceBusy, match=r"the queue is 2\.5 s behind \(the limit is 2 s\)"):
        service.submit(USER, [TaskInput(dict(PARAMS))])
    assert service.store.load(USER.key_id)[:2] == (2, 2)  # nothing accepted was lost
    (lease,) = service.queue.lease("w1", 1, 30)  # a worker takes the oldest: the queue catches up
    assert lease.task_id == first.task_id and service.store.start(first.task_id, 1)
    service.submit(USER, [TaskInput(dict(PARAMS))])  # accepted: the oldest queued has waited 1.0 s
    assert service.store.load(USER.key_id).oldest_queued_at == second.created_at
    limits = limits.model_copy(update={"max_queue_wait_s": 0.0})  # off: only the TTL bounds a wait
    service.settings = service.settings.model_copy(update={"service": limits})
    now[0] += 100
    service.submit(USER, [TaskInput(dict(PARAMS))])
