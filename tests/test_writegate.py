"""storage/writegate.py: SQLite writers take turns, threads on a lock and processes on an flock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from imagegenx.queue.embedded import EmbeddedQueue
from imagegenx.storage import writegate
from imagegenx.storage.tasks import TaskStore


def test_a_writer_waits_for_the_one_inside_and_enters_as_it_leaves(tmp_path):
    gate = writegate.gate_for(str(tmp_path / "db.sqlite"))
    events: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with gate.hold():
            events.append("first in")
            inside.set()
            time.sleep(0.3)
            with gate.hold():  # re-entrant: a queue write inside a store write
                events.append("first nested")
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with gate.hold():
        events.append("second in")
    thread.join()
    assert events == ["first in", "first nested", "first out", "second in"]


def test_one_gate_per_file_shared_by_the_store_and_its_queue(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with TaskStore(url) as a, TaskStore(url) as b:
        assert a._gate is b._gate is writegate.gate_for(str(tmp_path / "db.sqlite"))
        queue = EmbeddedQueue(a.engine, write_gate=a.writing)
        entered = threading.Event()
        with a.writing():  # another thread's queue write waits for the store's
            thread = threading.Thread(target=lambda: (queue.ack("nobody", "t1"), entered.set()))
            thread.start()
            assert not entered.wait(0.3)
        assert entered.wait(5)
        thread.join()
    assert writegate.gate_for(None) is None and writegate.gate_for(":memory:") is None


HOLDER = textwrap.dedent(
    """
    import sys, time
    from imagegenx.storage import writegate
    gate = writegate.gate_for(sys.argv[1])
    with gate.hold():
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
        print("released", time.time(), flush=True)
    """
)


def _holder(tmp_path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "db.sqlite"), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_inside_keeps_us_out_until_it_leaves(tmp_path):
    proc = _holder(tmp_path, 0.5)
    with writegate.gate_for(str(tmp_path / "db.sqlite")).hold():
        entered = time.time()
    released = float(proc.stdout.readline().split()[1])
    proc.wait(10)
    assert entered >= released


def test_past_the_wait_a_writer_goes_ahead_and_sqlite_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(writegate, "WAIT_S", 0.2)
    proc = _holder(tmp_path, 3.0)
    try:
        started = time.monotonic()
        with writegate.gate_for(str(tmp_path / "db.sqlite")).hold():
            waited = time.monotonic() - started
        assert 0.2 <= waited < 2.5
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("read_only", [True, False])
def test_only_writes_take_the_gate(tmp_path, read_only):
    with TaskStore(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        done = threading.Event()

        def transaction() -> None:
            with store._tx(read_only=read_only):
                done.set()

        with store.writing():
            thread = threading.Thread(target=transaction)
            thread.start()
            assert done.wait(0.3) is read_only
        thread.join()
        assert done.is_set()


HOG = textwrap.dedent(
    """
    import sys, time
    from imagegenx.storage import writegate
    gate = writegate.gate_for(sys.argv[1])
    print("writing", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:  # back-to-back writes of 2 ms, as an API's group commits under load
        with gate.hold():
            time.sleep(0.002)
    """
)


def test_a_process_writing_back_to_back_does_not_starve_another(tmp_path):
    """The turnstile: a writer that leaves must queue behind the process already waiting, so two
    processes alternate instead of the one that just left winning the race again and again."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOG, str(tmp_path / "db.sqlite"), "4"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        gate = writegate.gate_for(str(tmp_path / "db.sqlite"))
        waits = []
        for _ in range(40):
            started = time.monotonic()
            with gate.hold():
                waits.append(time.monotonic() - started)
            time.sleep(0.005)  # a worker's own work between its writes
        assert proc.poll() is None  # the other process was writing all along
    finally:
        proc.kill()
        proc.wait(10)
    assert max(waits) < 0.25, sorted(waits)[-5:]  # one or two of its writes, not seconds
