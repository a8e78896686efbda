"""Scale-out fault tests: `imagegenx api` and `imagegenx worker` as real processes on one machine,
sharing a fresh PostgreSQL database, a NATS JetStream queue (and cancel subject) and an S3 server
(SeaweedFS); tiny models on the CPU.

One cluster serves the whole module (process start-up dominates the cost), so the tests run in file
order and each leaves the workers it needs for the next. Leases last 3 s and a job may be delivered
twice, so redelivery after a crash takes seconds.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import obstore
import pytest

from imagegenx.api.webhooks import sign
from imagegenx.cli_roles import parse_gpus, visible_gpus
from imagegenx.queue.jetstream import JetStreamQueue
from imagegenx.types import UserError
from support.cluster import Cluster, Node
from support.server import free_port
from support.services import create_database, drop_database

LEASE_S = 3
MAX_DELIVERIES = 2
GRACE_S = 3  # a SIGTERMed worker's time to finish its jobs
FINAL = {"succeeded", "failed", "canceled", "expired"}


class Hooks(BaseHTTPRequestHandler):
    """A webhook receiver: keeps every delivery (headers and body)."""

    received: ClassVar[list[tuple[dict, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class Scene:
    """The module's cluster and the nodes the tests hand on to each other."""

    def __init__(self, cluster: Cluster, hooks_url: str, blobs) -> None:
        self.cluster = cluster
        self.hooks_url = hooks_url
        self.blobs = blobs  # the S3 bucket's prefix the nodes store into
        self.api, self.url = cluster.start_api()
        self.workers: dict[str, Node] = {}

    def results(self, task_id: str) -> list[str]:
        """The result files stored for a task (names under results/<task id>/)."""
        listing = obstore.list(self.blobs, prefix=f"results/{task_id}/").collect()
        return sorted(meta["path"].rsplit("/", 1)[1] for meta in listing)

    def task(self, task_id: str) -> dict:
        response = httpx.get(f"{self.url}/api/v1/image/task/{task_id}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def submit(self, texts: list[str], *, steps: int, side: int = 64, **extra) -> list[str]:
        body = {"texts": texts, "width": side, "height": side, "steps": steps, "seed": 7} | extra
        response = httpx.post(f"{self.url}/api/v1/image/batch-generate", json=body, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["data"]["task_ids"]

    def wait(self, task_ids: list[str], done, timeout: float = 90) -> list[dict]:
        """Poll until ``done(view)`` holds for every task; the cluster's logs explain a time-out."""
        deadline = time.monotonic() + timeout
        while True:
            views = [self.task(task_id) for task_id in task_ids]
            if all(done(view) for view in views):
                return views
            if time.monotonic() > deadline:
                states = [(v["status"], v["progress"], v["attempts"]) for v in views]
                pytest.fail(f"not done in {timeout} s: {states}\n{self.cluster.logs()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory, s3_server, nats_url):
    root = tmp_path_factory.mktemp("cluster")
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hooks = f"127.0.0.1:{receiver.server_port}"
    prefix = stream = f"scaleout-{uuid.uuid4().hex[:12]}"
    env = {
        "IMAGEGENX_QUEUE__URL": nats_url,
        "IMAGEGENX_QUEUE__STREAM": stream,
        "IMAGEGENX_SERVICE__ALLOWED_PRIVATE_HOSTS": json.dumps([hooks]),
        "IMAGEGENX_SERVICE__LEASE_S": str(LEASE_S),
        "IMAGEGENX_SERVICE__MAX_DELIVERIES": str(MAX_DELIVERIES),
        "IMAGEGENX_ENGINE__MAX_BATCH": "8",
        "IMAGEGENX_STORAGE__BLOB_URL": s3_server.url(prefix),
        "IMAGEGENX_STORAGE__S3_ENDPOINT": s3_server.endpoint,
        "IMAGEGENX_STORAGE__S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "IMAGEGENX_STORAGE__S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
    }
    database = create_database()
    cluster = Cluster(root, database.render_as_string(hide_password=False), env=env)
    try:
        yield Scene(cluster, f"http://{hooks}/hook", s3_server.raw_store(prefix))
    finally:
        cluster.close()
        receiver.shutdown()
        drop_database(database)
        queue = JetStreamQueue(nats_url, stream, ack_wait_s=LEASE_S)
        queue.drop()
        queue.close()


def _maps(node: Node) -> str:
    return Path(f"/proc/{node.proc.pid}/maps").read_text()


def test_kill9_worker_mid_batch_every_job_finishes_once_elsewhere(scene):
    cluster = scene.cluster
    first = cluster.start_worker("w1", wait=False)
    metrics_port = free_port()
    second = cluster.start_worker(
        "w2", wait=False, env={"IMAGEGENX_SERVICE__METRICS_PORT": str(metrics_port)}
    )
    first.wait_for_line(" ready (")
    second.wait_for_line(" ready (")
    second.signal(signal.SIGSTOP)  # frozen: the whole batch goes to the first worker
    # Long enough for the batch's progress (written at most every 0.5 s) to show mid-run before it ends
    task_ids = scene.submit([f"a lighthouse {i}" for i in range(6)], steps=150, side=128)
    scene.wait(task_ids, lambda v: v["status"] == "processing" and 0 < v["progress"] < 60)

    first.kill()
    second.signal(signal.SIGCONT)
    views = scene.wait(task_ids, lambda v: v["status"] in FINAL)

    assert [v["status"] for v in views] == ["succeeded"] * 6, cluster.logs()
    assert [v["attempts"] for v in views] == [2] * 6  # the killed run, then the other worker's
    for task_id in task_ids:  # one result set each: the original and two thumbnails
        assert scene.results(task_id) == ["256.webp", "512.webp", "original.webp"]
    assert sum("task succeeded" in line for line in second.log.read_text().splitlines()) == 6
    assert "libtorch" in _maps(second) and "libtorch" not in _maps(scene.api)  # API node: no torch
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text  # the worker's only HTTP
    assert "imagegenx_" in metrics
    scene.workers["w2"] = second


def test_sse_and_webhook_follow_a_job_run_by_a_worker(scene):
    # Workers write progress at most every 0.5 s (engine/jobnotes.py): a job of a few seconds, so
    # the API node's relay sees some of it.
    (task_id,) = scene.submit(["a harbour at dusk"], steps=40, side=256, callback_url=scene.hooks_url)
    events = []
    with httpx.stream("GET", f"{scene.url}/api/v1/image/task/{task_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if events[-1]["status"] in FINAL:
                    break
    progress = [e["progress"] for e in events if e["status"] == "processing"]
    assert events[-1] == {"status": "succeeded", "progress": 100}
    assert any(0 < p < 100 for p in progress), events
    assert progress == sorted(progress)

    deadline = time.monotonic() + 10  # the worker that finished it sends the webhook, signed
    while not Hooks.received and time.monotonic() < deadline:
        time.sleep(0.1)
    ((headers, body),) = Hooks.received
    assert json.loads(body)["type"] == "task.succeeded" and json.loads(body)["data"]["task_id"] == task_id
    secret = (scene.cluster.root / "webhook_secret").read_text().strip()
    expected = sign(secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    assert headers["webhook-signature"] == expected


def test_cancel_through_the_api_node_stops_the_job_on_its_worker(scene):
    (task_id,) = scene.submit(["a very long job"], steps=150, side=256)
    scene.wait([task_id], lambda v: v["status"] == "processing" and v["progress"] >= 5)
    asked = time.monotonic()
    response = httpx.post(f"{scene.url}/api/v1/image/task/{task_id}/cancel", timeout=10)
    assert response.status_code == 200, response.text
    (view,) = scene.wait([task_id], lambda v: v["status"] in FINAL, timeout=30)
    assert view["status"] == "canceled"
    assert view["progress"] < 100 and not view["urls"]
    assert time.monotonic() - asked < 10  # stopped at a step, not after its remaining ~100 steps
    assert scene.results(task_id) == []


def test_api_node_restarted_under_load_loses_no_accepted_task(scene):
    scene.workers["w3"] = scene.cluster.start_worker("w3", args=("--grace", str(GRACE_S)))
    port = int(scene.url.rsplit(":", 1)[1])
    accepted: list[str] = []
    refused = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal refused
        with httpx.Client(timeout=5) as http:
            while not stop.is_set():
                body = {"text": "load", "width": 64, "height": 64, "steps": 2}
                try:
                    response = http.post(f"{scene.url}/api/v1/image/generate", json=body)
                except httpx.HTTPError:
                    refused += 1
                else:
                    if response.status_code == 200:
                        accepted.extend(response.json()["data"]["task_ids"])
                time.sleep(0.08)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(2)
        before = len(accepted)
        scene.api.kill()
        scene.api, scene.url = scene.cluster.start_api(port)
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
    assert before > 5 and len(accepted) > before + 5  # submitted on both sides of the restart
    views = scene.wait(accepted, lambda v: v["status"] in FINAL, timeout=120)
    assert {v["status"] for v in views} == {"succeeded"}, [v for v in views if v["status"] != "succeeded"]
    assert len(set(accepted)) == len(accepted)


def test_sigterm_finishes_what_fits_in_the_grace_time_and_gives_back_the_rest(scene):
    worker, other = scene.workers.pop("w3"), scene.workers["w2"]
    other.signal(signal.SIGSTOP)  # both jobs go to the worker about to be stopped
    try:
        (short,) = scene.submit(["finish me"], steps=10, side=256)  # ~1 s: inside the grace time
        (long,) = scene.submit(["give me back"], steps=150, side=256)  # ~15 s: not
        # Both on the worker about to be stopped (the other is frozen). Progress is written at most
        # every 0.5 s, so the short job may end before any of its progress shows: started is enough.
        scene.wait([short], lambda v: v["status"] in ("processing", "succeeded"))
        scene.wait([long], lambda v: v["status"] == "processing" and v["progress"] > 0)
        assert worker.stop() == 0
    finally:
        other.signal(signal.SIGCONT)
    assert "stopped; 1 job(s) given back" in worker.log.read_text(), worker.tail()
    (view,) = scene.wait([short], lambda v: v["status"] in FINAL)
    assert (view["status"], view["attempts"]) == ("succeeded", 1)
    # The other worker took the long one at once (no lease to wait out); it need not finish here.
    scene.wait([long], lambda v: v["status"] == "processing" and v["attempts"] == 2, timeout=20)
    httpx.post(f"{scene.url}/api/v1/image/task/{long}/cancel", timeout=10).raise_for_status()
    scene.wait([long], lambda v: v["status"] == "canceled", timeout=20)


def test_poison_job_fails_with_the_delivery_cap_reason(scene):
    assert scene.workers.pop("w2").stop() == 0  # only workers that die on the poison remain
    cluster = scene.cluster
    poisoned = [
        cluster.start_worker(f"poison{i}", module="support.poison_worker", wait=False) for i in (1, 2)
    ]
    for node in poisoned:
        node.wait_for_line(" ready (")
    (task_id,) = scene.submit(["POISON pill"], steps=4)
    for node in poisoned:  # each delivery kills the worker that took it
        assert node.proc.wait(60) == 86, node.tail()
    last = cluster.start_worker("poison3", module="support.poison_worker")
    (view,) = scene.wait([task_id], lambda v: v["status"] in FINAL, timeout=60)
    assert view["status"] == "failed"
    assert view["error"] == f"gave up after {MAX_DELIVERIES} attempts that did not finish"
    assert last.proc.poll() is None  # the third delivery was refused, not run


def test_gpus_option():
    assert parse_gpus(None) is None and parse_gpus(" ") is None  # one worker on the configured device
    assert parse_gpus("0,1") == ["0", "1"] and parse_gpus("3") == ["3"]
    assert parse_gpus("all") == (visible_gpus() or None)  # a CPU machine: one CPU worker
    for bad in ("gpu0", "0,0", ",", "-1"):
        with pytest.raises(UserError):
            parse_gpus(bad)
