"""A real `imagegenx serve` process for tests: its own database, blob folder and port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        root: Path,
        *,
        model: str = "random:tiny-sd15",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.args = args  # more `imagegenx serve` options
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = f"sqlite:///{root / 'db.sqlite'}"
        self.env = (
            os.environ
            | {
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1",
                "IMAGEGENX_STORAGE__DATABASE_URL": self.database_url,
                "IMAGEGENX_STORAGE__BLOB_URL": str(root / "blobs"),
                "IMAGEGENX_STORAGE__SPOOL_DIR": str(root / "spool"),
                "IMAGEGENX_MODELS__MODEL_DIR": str(root / "models"),
                "IMAGEGENX_MODELS__LORA_DIR": str(root / "loras"),
                "IMAGEGENX_MODELS__DEVICE": "cpu",
            }
            | (env or {})
        )
        self.proc: subprocess.Popen | None = None
        self.log = root / "serve.log"

    def start(self, timeout: float = 180) -> Server:
        cmd = [
            sys.executable,
            "-m",
            "imagegenx.cli",
            "serve",
            "--model",
            self.model,
            "--port",
            str(self.port),
            *self.args,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def key(self, tier: str = "paid", rate: float = 1000.0, quota: int = 10_000) -> str:
        from imagegenx.storage.tasks import TaskStore
        from imagegenx.types import Tier

        store = TaskStore(self.database_url)
        try:
            return store.create_key("test", Tier(tier), rate, quota)[1]
        finally:
            store.close()

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def wait_for(
    client: httpx.Client,
    task_id: str,
    timeout: float = 120,
    until=("succeeded", "failed", "canceled", "expired"),
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/api/v1/image/task/{task_id}").json()["data"]
        if view["status"] in until:
            return view
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} still {view['status']} after {timeout} s")
