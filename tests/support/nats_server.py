"""A NATS server with JetStream for the tests: the running one at ``IMAGEGENX_TEST_NATS`` (default
``nats://127.0.0.1:4222``), else ``nats-server -js`` started on that port for the session.

The fixture FAILS the test when neither works: CI must never skip the JetStream tests silently.
Registered for every test file in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

NATS_URL = os.environ.get("IMAGEGENX_TEST_NATS", "nats://127.0.0.1:4222")


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory) -> Iterator[str]:
    parts = urlsplit(NATS_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    if _reachable(host, port):
        yield NATS_URL
        return
    server = shutil.which("nats-server")
    if server is None:
        pytest.fail(
            f"NATS is needed at {NATS_URL} and nats-server is not installed (apt-get install nats-server)"
        )
    store = tmp_path_factory.mktemp("jetstream")
    log = open(store / "nats.log", "w")  # noqa: SIM115 (open for the server's life)
    process = subprocess.Popen(
        [server, "-js", "-a", host, "-p", str(port), "-sd", str(store)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 20
    while not _reachable(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = (store / "nats.log").read_text()
            pytest.fail(f"NATS is needed at {NATS_URL} and nats-server did not start: {output}")
        time.sleep(0.1)
    yield NATS_URL
    process.terminate()
    process.wait(timeout=10)
    log.close()
