"""Faults, each a test: NaN output, CUDA out of memory (simulated), the database away, a full disk."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import make_settings
from imagegenx.api.webhooks import new_secret
from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.pipelines.hostcopy import HostCopy
from imagegenx.types import JobSpec
from support.server import Server, wait_for
from support.services import create_database, drop_database

MODEL = "random:tiny-sdxl"
SMALL = {"width": 64, "height": 64, "steps": 2}


def _job(**kw) -> JobSpec:
    base = {"model": MODEL, "width": 64, "height": 64, "steps": 2, "seed": 7}
    return JobSpec("a red fox in snow", **(base | kw))


def _submit(client, body: dict) -> str:
    response = client.post("/api/v1/image/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["data"]["task_ids"][0]


# -- NaN output ----------------------------------------------------------------------------------------


def test_nan_output_is_retried_with_a_new_seed(tmp_path):
    with Engine(make_settings(tmp_path, nan_policy="retry", nan_retries=2)) as engine:
        engine.submit(_job(seed=1)).result(timeout=120)  # loads the model and its runner
        runner = engine.models.get(MODEL).extras["runner"]
        real_decode, seen = runner.start_decode, []

        def first_decode_overflows(samples):  # as a fp16 VAE overflowing on one unlucky seed
            seen.extend(s.job.seed for s in samples)
            pending = real_decode(samples)
            if len(seen) == 1:
                pending.finite = HostCopy(torch.zeros(len(samples), dtype=torch.bool))
            return pending

        runner.start_decode = first_decode_overflows
        result = engine.submit(_job(job_id="n1", seed=7)).result(timeout=120)
    assert result.job.job_id == "n1" and len(seen) == 2
    assert seen[0] == 7 and result.job.seed == seen[1] != 7  # the image says which seed made it


def test_nan_output_fails_with_a_reason(tmp_path):
    for policy, tries in [("fail", ""), ("retry", "in 3 tries")]:
        with Engine(make_settings(tmp_path, nan_policy=policy, nan_retries=2)) as engine:
            engine.submit(_job()).result(timeout=120)
            with torch.no_grad():
                engine.models.get(MODEL).pipe.vae.post_quant_conv.weight.fill_(float("nan"))
            with pytest.raises(JobFailed, match=f"NaN/infinite values \\(numerical overflow\\) ?{tries}"):
                engine.submit(_job(seed=99)).result(timeout=120)
            assert not engine._nan_tries  # nothing kept for finished jobs


# -- CUDA out of memory, simulated on the CPU by a settings hook ----------------------------------------


def test_out_of_memory_splits_batches_and_every_job_succeeds(tmp_path):
    env = {
        "IMAGEGENX_ENGINE__FAULT_OOM_ABOVE_ROWS": "2",  # room for one guided image per UNet call
        "IMAGEGENX_ENGINE__MAX_BATCH": "4",
        "IMAGEGENX_ENGINE__BATCH_WINDOW_MS": "1500",  # the four jobs meet in one batch
    }
    server = Server(tmp_path, model=MODEL, env=env).start()
    try:
        with server.client(server.key()) as client:
            tasks = [_submit(client, {"text": f"fox {i}", **SMALL, "seed": i}) for i in range(4)]
            views = [wait_for(client, t, timeout=180) for t in tasks]
            assert [v["status"] for v in views] == ["succeeded"] * 4, views
            metrics = client.get("/metrics").text
        splits = [line for line in metrics.splitlines() if line.startswith("imagegenx_oom_splits_total")]
        assert splits and float(splits[0].split()[-1]) >= 1, splits
    finally:
        server.stop()


# -- kill -9 of the single-process server in the middle of a batch -------------------------------------


def test_kill9_mid_batch_loses_no_job_and_reruns_only_the_batch(tmp_path):
    env = {"IMAGEGENX_ENGINE__MAX_BATCH": "4", "IMAGEGENX_ENGINE__BATCH_WINDOW_MS": "1500"}
    server = Server(tmp_path, model=MODEL, env=env).start()
    key = server.key()
    try:
        with server.client(key) as client:
            slow = SMALL | {"steps": 120}
            batch = [_submit(client, {"text": f"batch {i}", **slow, "seed": i}) for i in range(4)]
            waiting = [_submit(client, {"text": f"after {i}", **SMALL, "seed": i}) for i in range(2)]
            for task in batch:
                wait_for(client, task, until=("processing",))
            server.kill()  # all four in one UNet batch, two more queued behind them
        server.start()
        with server.client(key) as client:
            views = [wait_for(client, t, timeout=300) for t in batch + waiting]
            assert [v["status"] for v in views] == ["succeeded"] * 6, views
            assert [v["attempts"] for v in views] == [2, 2, 2, 2, 1, 1]  # the batch ran again, once
            for view in views:
                assert client.get(view["urls"]["original"]).status_code == 200
    finally:
        server.stop()


# -- the database away for a while ----------------------------------------------------------------------


class _Proxy:
    """A TCP proxy to PostgreSQL that can be cut: while down, every connection is closed at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.open.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_database_outage_answers_503_and_loses_no_accepted_task(tmp_path):
    url = create_database()
    proxy = _Proxy((url.host, url.port))
    via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = {
        "IMAGEGENX_STORAGE__DATABASE_URL": via_proxy,
        "IMAGEGENX_ENGINE__MAX_BATCH": "1",
        "IMAGEGENX_SERVICE__LEASE_S": "4",  # a job whose result could not be committed comes back soon
    }
    server = Server(tmp_path, model=MODEL, env=env)
    server.database_url = url.render_as_string(hide_password=False)  # keys are made directly
    server.start()
    try:
        with server.client(server.key()) as client:
            slow = SMALL | {"steps": 100}  # still running when the database goes away
            accepted = [_submit(client, {"text": f"before {i}", **slow, "seed": i}) for i in range(3)]
            wait_for(client, accepted[0], until=("processing",))
            proxy.cut()
            refused = client.post("/api/v1/image/generate", json={"text": "during", **SMALL})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert "database is unavailable" in refused.json()["message"]
            assert client.get(f"/api/v1/image/task/{accepted[0]}").status_code == 503
            time.sleep(3)  # the worker meets the outage too, mid-job
            proxy.restore()
            views = [wait_for(client, t, timeout=180) for t in accepted]
            assert [v["status"] for v in views] == ["succeeded"] * 3, views
            for view in views:
                assert client.get(view["urls"]["original"]).status_code == 200
            lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
            met = [x for x in lines if x["logger"] == "imagegenx.worker" and x["level"] != "info"]
            assert met, "the worker never met the outage"
            listed = client.get("/api/v1/image/tasks", params={"page_size": 50}).json()["data"]
            texts = {item["params"]["prompt"] for item in listed["items"]}
            assert "during" not in texts and {"before 0", "before 1", "before 2"} <= texts
    finally:
        server.stop()
        proxy.close()
        drop_database(url)


# -- a full disk under the blob store (and under the spool) ---------------------------------------------


@contextlib.contextmanager
def _full_tmpfs(path: Path, folders=(), files=None, size_kb: int = 256):
    """A tiny tmpfs at ``path`` with ``folders`` and ``files`` in it, filled up: writes there fail (ENOSPC).

    Mounting needs root (as in CI's containers); without it the test fails rather than skips."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tiny tmpfs to fill a disk: run it as root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True)
    try:
        for folder in folders:
            (path / folder).mkdir()
        for name, text in (files or {}).items():
            (path / name).write_text(text)
        filler = path / ".filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        assert shutil.disk_usage(path).free < 8192
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_spools_and_never_reports_a_missing_image(tmp_path):
    server = Server(tmp_path, model=MODEL, env={"IMAGEGENX_ENGINE__MAX_BATCH": "1"})
    with _full_tmpfs(tmp_path / "blobs") as filler:
        server.start()
        try:
            with server.client(server.key()) as client:
                # 1. The store's disk is full: the images go to the spool, the task succeeds and serves them.
                spooled = _submit(client, {"text": "spooled", **SMALL})
                view = wait_for(client, spooled)
                assert view["status"] == "succeeded", view
                assert client.get(view["urls"]["original"]).status_code == 200
                assert list((tmp_path / "spool").rglob("original.*"))
                # 2. Room again: the spool drains into the store (the worker's sweep, every second).
                filler.unlink()
                deadline = time.monotonic() + 30
                while list((tmp_path / "spool").rglob("original.*")) and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert list((tmp_path / "blobs").rglob("original.*"))
                assert client.get(view["urls"]["original"]).status_code == 200
        finally:
            server.stop()


def test_store_and_spool_both_full_reports_no_success(tmp_path):
    disk = tmp_path / "disk"
    env = {
        "IMAGEGENX_ENGINE__MAX_BATCH": "1",
        "IMAGEGENX_STORAGE__BLOB_URL": str(disk / "blobs"),
        "IMAGEGENX_STORAGE__SPOOL_DIR": str(disk / "spool"),
    }
    server = Server(tmp_path, model=MODEL, env=env)
    secret = {"webhook_secret": new_secret()}  # the server keeps it beside the spool
    with _full_tmpfs(disk, folders=("blobs", "spool"), files=secret) as filler:
        server.start()
        try:
            with server.client(server.key()) as client:
                task = _submit(client, {"text": "nowhere to write", **SMALL})
                deadline = time.monotonic() + 7  # the worker tries, fails to store, backs off 5 s
                while time.monotonic() < deadline:
                    view = client.get(f"/api/v1/image/task/{task}").json()["data"]
                    assert view["status"] != "succeeded", "success reported for an image that was not stored"
                    time.sleep(0.3)
                assert "could not store results" in server.log.read_text()
                filler.unlink()  # room again: the retried job stores its image and succeeds
                view = wait_for(client, task, timeout=120)
                if view["status"] == "succeeded":
                    assert client.get(view["urls"]["original"]).status_code == 200
                else:  # out of deliveries meanwhile: failed, with the reason
                    assert view["status"] == "failed" and view["error"], view
        finally:
            server.stop()
