"""A scaled-out imagegenx on one machine for tests: API nodes and workers as real processes.

They share one task database, one blob store (a folder of the cluster's, or S3 through ``env``) and
one queue (in the task database, or NATS through ``env``); each process writes its own log under the
cluster's folder, which failing tests print.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from support.server import free_port


class Node:
    """One `imagegenx api` or `imagegenx worker` process."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.cmd, self.env, self.log = name, cmd, env, log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} ---\n{self.log.read_text(errors='replace')[-chars:]}"

    def wait_for_line(self, text: str, timeout: float = 120, count: int = 1) -> None:
        """Until ``text`` appears ``count`` times in the log; raises if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.read_text(errors="replace").count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {text!r} in {timeout} s\n{self.tail()}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the graceful path."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process must run to stop
            self.proc.terminate()
        return self.proc.wait(timeout)


class Cluster:
    """API nodes and workers sharing ``database_url``, a blob folder and optionally a NATS url."""

    def __init__(self, root: Path, database_url: str, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.nodes: list[Node] = []
        for name in ("models", "loras", "blobs", "spool"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.env = (
            os.environ
            | {
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1",
                # support.* test wrappers, before what the caller's environment has
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                "IMAGEGENX_STORAGE__DATABASE_URL": database_url,
                "IMAGEGENX_STORAGE__BLOB_URL": str(root / "blobs"),
                "IMAGEGENX_STORAGE__SPOOL_DIR": str(root / "spool"),
                "IMAGEGENX_MODELS__MODEL_DIR": str(root / "models"),
                "IMAGEGENX_MODELS__LORA_DIR": str(root / "loras"),
                "IMAGEGENX_MODELS__DEVICE": "cpu",
                "IMAGEGENX_MODELS__DEFAULT_MODEL": "random:tiny-sdxl",
                "IMAGEGENX_SERVICE__REQUIRE_KEYS": "false",
                "IMAGEGENX_SERVICE__PROMPT_FILTER": "false",
            }
            | (env or {})
        )

    def start_api(self, port: int | None = None, timeout: float = 60) -> tuple[Node, str]:
        """An API node; returns it and its base URL once /readyz answers 200."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "imagegenx.cli", "api", "--port", str(port)]
        node = self._start(f"api-{port}", cmd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"API node exited with {node.proc.returncode}\n{node.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return node, url
            time.sleep(0.2)
        raise TimeoutError(f"API node not ready in {timeout} s\n{node.tail()}")

    def start_worker(
        self,
        name: str,
        *,
        module: str = "imagegenx.cli",
        wait: bool = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> Node:
        """A worker (``module``: a test wrapper around the CLI, for a worker that crashes on purpose;
        ``env``: settings of this worker alone; ``args``: more options, e.g. ``--gpus 0,1``)."""
        node = self._start(name, [sys.executable, "-m", module, "worker", *args], env)
        if wait:
            node.wait_for_line(" ready (")
        return node

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Node:
        node = Node(name, cmd, self.env | (env or {}), self.root / f"{name}.log")
        self.nodes.append(node)
        return node

    def logs(self) -> str:
        return "\n".join(node.tail() for node in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
                node.proc.kill()
                node.proc.wait(30)
