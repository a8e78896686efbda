"""Session fixtures for the real servers the scale-out tests need: PostgreSQL, Redis and S3 (SeaweedFS).

Each is started when it is down (the local PostgreSQL cluster, ``redis-server``, ``weed mini``) and the
test FAILS when that is impossible: CI must never skip the integration tests silently. They are
registered for every test file in ``tests/conftest.py``.

* ``postgres_url``: a fresh database on the server named by ``IMAGEGENX_TEST_POSTGRES`` (a libpq DSN,
  default the local trust-auth server), as a ``postgresql+psycopg`` URL (psycopg 3); dropped at the end.
* ``redis_url``: ``redis://127.0.0.1:6379/<db>`` (``IMAGEGENX_TEST_REDIS`` to point elsewhere).
* ``s3_server``: a running :class:`support.s3.SeaweedS3` in a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import URL

from support.s3 import SeaweedS3

if TYPE_CHECKING:  # imported where used: the GPU machine's CUDA tests run without these clients
    import psycopg
    import redis

POSTGRES_DSN = os.environ.get(
    "IMAGEGENX_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
REDIS_URL = os.environ.get("IMAGEGENX_TEST_REDIS", "redis://127.0.0.1:6379/9")


def _retry(connect, start, what: str, timeout_s: float = 20.0):
    """``connect()``, else ``start()`` once and retry until ``timeout_s``; fail the test if it never works."""
    try:
        return connect()
    except Exception:
        start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return connect()
        except Exception as error:
            if time.monotonic() > deadline:
                pytest.fail(f"{what} is needed and could not be reached or started: {error}")
            time.sleep(0.3)


# --- PostgreSQL --------------------------------------------------------------------------------------


def _start_postgres() -> None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    for version in versions:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            capture_output=True,
            timeout=60,
            check=False,
        )


def postgres_admin() -> psycopg.Connection:
    """An autocommit connection to the server's admin database (started if needed)."""
    import psycopg

    return _retry(
        lambda: psycopg.connect(POSTGRES_DSN, connect_timeout=3, autocommit=True),
        _start_postgres,
        f"PostgreSQL ({POSTGRES_DSN})",
    )


def create_database() -> URL:
    """A new empty database; drop it with ``drop_database(url)``."""
    name = f"imagegenx_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        info = admin.info
        return URL.create(
            "postgresql+psycopg",
            username=info.user,
            password=info.password or None,
            host=info.host,
            port=info.port,
            database=name,
        )


def drop_database(url: URL) -> None:
    with postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[URL]:
    """A fresh database on the PostgreSQL server for this session, dropped at the end."""
    url = create_database()
    yield url
    drop_database(url)


# --- Redis -------------------------------------------------------------------------------------------


def _start_redis() -> None:
    server = shutil.which("redis-server")
    if server is None:
        return
    subprocess.run(
        [server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", ""],
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database for the tests (started if down), flushed first."""
    import redis

    client = _retry(
        lambda: _pinged(redis.Redis.from_url(REDIS_URL, socket_timeout=3)),
        _start_redis,
        f"Redis ({REDIS_URL})",
    )
    client.flushdb()
    client.close()
    return REDIS_URL


def _pinged(client: redis.Redis) -> redis.Redis:
    client.ping()
    return client


# --- S3 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()
