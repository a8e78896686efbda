"""engine/intake.py: how much a worker leases while earlier results are still being stored."""

from __future__ import annotations

from pathlib import Path

from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.engine.held_tasks import HeldTasks
from imagegenx.engine.intake import Intake
from imagegenx.engine.portrait_runner import PortraitRunner
from imagegenx.engine.service import Service, TaskInput
from imagegenx.queue.embedded import EmbeddedQueue
from imagegenx.storage.blobs import BlobStore
from imagegenx.storage.tasks import TaskStore
from imagegenx.types import ApiKey, Tier

USER = ApiKey("k1", "test", Tier.PAID, rate_limit_per_s=0, queue_quota=1000, created_at=0)
PARAMS = {"prompt": "a fox", "model": "random:tiny-sd15", "width": 64, "height": 64, "steps": 1}


def _leased_while_storing(tmp_path: Path, storing: int, allowance: int) -> int:
    """Tasks in flight after one lease_more, with ``storing`` finished ones still being stored."""
    settings = make_settings(tmp_path)
    store = TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    service = Service(
        settings, store, EmbeddedQueue(store.engine), BlobStore(str(tmp_path / "blobs"), tmp_path / "spool")
    )
    service.submit(USER, [TaskInput(dict(PARAMS)) for _ in range(10)])
    with Engine(settings) as engine:
        held = HeldTasks(service, "w1")
        held.storing.update(f"stored-{i}" for i in range(storing))
        portraits = PortraitRunner(service, engine, held, lambda: False)
        intake = Intake(service, engine, held, portraits, capacity=4, lease_s=60, storing_allowance=allowance)
        intake.lease_more()
        for job in held.in_flight.values():
            job.future.result(timeout=120)  # the engine ran what was leased
        return len(held.in_flight)


def test_one_batch_being_stored_does_not_shrink_what_the_engine_holds(tmp_path):
    assert _leased_while_storing(tmp_path / "a", storing=2, allowance=2) == 4


def test_more_than_the_allowance_being_stored_holds_leases_back(tmp_path):
    """Back-pressure stays: results that pile up past one batch stop the leasing."""
    assert _leased_while_storing(tmp_path / "b", storing=5, allowance=2) == 1
    assert _leased_while_storing(tmp_path / "c", storing=2, allowance=0) == 2  # the old rule
