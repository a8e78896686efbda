"""A worker told to stop (SIGTERM's drain) gives back the jobs it cannot finish in its grace time:
ready again for another worker, never stored as cancelled."""

import time
from pathlib import Path

from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.engine.service import Service, TaskInput
from imagegenx.engine.worker import ServiceWorker
from imagegenx.queue.embedded import EmbeddedQueue
from imagegenx.storage.blobs import BlobStore
from imagegenx.storage.tasks import TaskStore
from imagegenx.types import ApiKey, TaskStatus, Tier

USER = ApiKey("k1", "test", Tier.PAID, rate_limit_per_s=0, queue_quota=1000, created_at=0)
LONG = {"prompt": "a lighthouse", "model": "random:tiny-sdxl", "width": 64, "height": 64, "steps": 150}


def _service(root: Path) -> Service:
    store = TaskStore(f"sqlite:///{root / 'db.sqlite'}")
    blobs = BlobStore(str(root / "blobs"), root / "spool")
    return Service(make_settings(root), store, EmbeddedQueue(store.engine), blobs)


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_running_job_is_given_back_not_cancelled(tmp_path, monkeypatch):
    service = _service(tmp_path)
    engine = Engine(service.settings)
    worker = ServiceWorker(service, engine, owner="w1")
    # The engine stops a cancelled job at its next step; here each cancel also waits long enough for
    # a loop turn to have taken that job as finished, were the loop still running (the race that
    # stored a drained job as the user's cancel and acknowledged it).
    real_cancel = engine.cancel

    def cancel_then_wait(task_id: str) -> None:
        real_cancel(task_id)
        time.sleep(1.0)

    monkeypatch.setattr(engine, "cancel", cancel_then_wait)
    try:
        worker.start()
        (record,) = service.submit(USER, [TaskInput(dict(LONG))])
        _wait(lambda: service.store.get(record.task_id).status is TaskStatus.PROCESSING)
        given_back = worker.drain(timeout_s=0)
    finally:
        engine.close()
    assert given_back == [record.task_id]
    assert service.store.get(record.task_id).status is not TaskStatus.CANCELED
    (again,) = service.queue.lease("w2", 5, 30)  # ready at once for another worker, a second delivery
    assert again.task_id == record.task_id and again.delivery == 2
