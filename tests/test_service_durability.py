"""Faults and time: kill -9 and restart, expiry of stale queued tasks, priority lanes."""

import os
import signal
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.server import Server, free_port, wait_for


def _submit(client, body: dict) -> str:
    response = client.post("/api/v1/image/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["data"]["task_ids"][0]


def test_kill_and_restart_loses_nothing_and_runs_nothing_twice(tmp_path):
    server = Server(tmp_path, env={"IMAGEGENX_ENGINE__MAX_BATCH": "1"}).start()
    key = server.key()
    try:
        with server.client(key) as client:
            finished = _submit(client, {"text": "first", "width": 64, "height": 64, "steps": 2})
            done_before = wait_for(client, finished)
            slow = {"text": "slow", "width": 64, "height": 64, "steps": 150}
            tasks = [_submit(client, slow | {"seed": i}) for i in range(4)]
            running = wait_for(client, tasks[0], until=("processing",))
            assert running["attempts"] == 1
            server.kill()  # mid-batch: one task processing, three queued
        server.start()
        with server.client(key) as client:
            views = [wait_for(client, t, timeout=300) for t in tasks]
            assert [v["status"] for v in views] == ["succeeded"] * 4
            assert views[0]["attempts"] == 2  # it was running at the kill: retried, counted
            assert all(v["attempts"] == 1 for v in views[1:])  # they had never started
            after = client.get(f"/api/v1/image/task/{finished}").json()["data"]
            assert (
                after["attempts"] == 1 and after["finished_at"] == done_before["finished_at"]
            )  # not run again
            for view in views:
                assert client.get(view["urls"]["original"]).status_code == 200
    finally:
        server.stop()


def test_stale_queued_tasks_expire(tmp_path):
    env = {"IMAGEGENX_SERVICE__QUEUED_TASK_TTL_S": "1.0", "IMAGEGENX_ENGINE__MAX_BATCH": "1"}
    server = Server(tmp_path, env=env).start()
    try:
        with server.client(server.key()) as client:
            busy = _submit(client, {"text": "busy", "width": 256, "height": 256, "steps": 150})
            wait_for(client, busy, until=("processing",))
            late = _submit(client, {"text": "late", "width": 72, "height": 72, "steps": 2})
            view = wait_for(client, late, timeout=60, until=("expired", "succeeded"))
            assert view["status"] == "expired"
            client.post(f"/api/v1/image/task/{busy}/cancel")
    finally:
        server.stop()


def test_urgent_lane_overtakes_queued_work(tmp_path):
    server = Server(tmp_path, env={"IMAGEGENX_ENGINE__MAX_BATCH": "1"}).start()
    try:
        with server.client(server.key()) as client:
            # Jobs long enough that none finishes before the urgent one arrives, however fast the
            # engine starts them
            body = {"width": 64, "height": 64, "steps": 80}
            low = [
                _submit(client, body | {"text": f"low {i}", "priority": 3, "width": 64 + 8 * i})
                for i in range(5)
            ]
            time.sleep(0.2)
            urgent = _submit(client, body | {"text": "urgent", "priority": 0, "width": 128})
            finished = {t: wait_for(client, t)["finished_at"] for t in [*low, urgent]}
            order = sorted(finished, key=finished.get)
            assert order.index(urgent) <= 2  # at most the one or two already leased go first
    finally:
        server.stop()


def test_a_full_queue_answers_503_and_keeps_what_it_accepted(tmp_path):
    env = {"IMAGEGENX_SERVICE__MAX_QUEUED_TASKS": "2", "IMAGEGENX_ENGINE__MAX_BATCH": "1"}
    server = Server(tmp_path, env=env).start()
    try:
        with server.client(server.key()) as client:
            slow = {"width": 256, "height": 256, "steps": 150}
            busy = _submit(client, slow | {"text": "busy"})
            wait_for(client, busy, until=("processing",))
            accepted = [_submit(client, slow | {"text": f"wait {i}", "width": 72}) for i in range(2)]
            refused = client.post("/api/v1/image/generate", json=slow | {"text": "one too many"})
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["code"] == 503 and "queue is full" in refused.json()["message"]
            for task_id in [busy, *accepted]:
                assert client.get(f"/api/v1/image/task/{task_id}").json()["data"]["status"] in (
                    "queued",
                    "processing",
                )
                client.post(f"/api/v1/image/task/{task_id}/cancel")
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    """The live direct children of ``pid`` (Linux /proc): a killed one stays a zombie until its
    parent reaps it, and that is not a worker."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if not _zombie(int(p))]


@pytest.mark.parametrize("args", [("--worker-process",), ("--worker-processes", "2")])
def test_serve_with_worker_processes_runs_tasks_and_restarts_a_dead_worker(tmp_path, args):
    metrics_port = free_port()  # the i-th worker serves its /metrics on metrics_port + i
    server = Server(tmp_path, args=args, env={"IMAGEGENX_SERVICE__METRICS_PORT": str(metrics_port)}).start()
    count = int(args[-1]) if len(args) == 2 else 1
    try:
        with server.client(server.key()) as client:
            first = [
                _submit(client, {"text": f"one {i}", "width": 64, "height": 64, "steps": 2}) for i in range(3)
            ]
            assert all(wait_for(client, t)["status"] == "succeeded" for t in first)
            # Each worker answers on its own port (one may still be warming up: its count can be 0).
            made = [_images_made(metrics_port + i) for i in range(count)]
            assert len(made) == count and sum(made) >= 3
            workers = _children(server.proc.pid)
            assert len(workers) == count
            os.kill(workers[0], signal.SIGKILL)  # an engine's process dies: the API stays, a new one comes
            second = _submit(client, {"text": "two", "width": 64, "height": 64, "steps": 2})
            assert wait_for(client, second, timeout=180)["status"] == "succeeded"
            deadline = time.monotonic() + 60
            now = _children(server.proc.pid)
            while (len(now) < count or workers[0] in now) and time.monotonic() < deadline:
                time.sleep(0.2)
                now = _children(server.proc.pid)
            assert len(now) == count and workers[0] not in now and set(workers[1:]) <= set(now)
            restarted = next(pid for pid in now if pid not in workers)
    finally:
        server.stop()
    deadline = time.monotonic() + 60  # the worker stops with the server (it drains first)
    while os.path.exists(f"/proc/{restarted}") and not _zombie(restarted) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{restarted}") or _zombie(restarted)


def _images_made(port: int, timeout: float = 60) -> float:
    """The images a worker's /metrics counts as succeeded (waiting for a starting worker's page)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "imagegenx_images"
        for sample in family.samples
        if sample.name == "imagegenx_images_total" and sample.labels.get("status") == "succeeded"
    )


def _zombie(pid: int) -> bool:
    """Exited (a zombie until reaped, or gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True
