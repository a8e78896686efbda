"""RedisRateLimiter against a real Redis: one budget shared by API nodes, the same answers as the in-memory
limiter, keys that expire, and what happens while Redis is down (this node's own buckets take over).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from imagegenx.api.ratelimit import Limiter, RateLimiter, RedisRateLimiter, open_limiter
from support.server import free_port


@pytest.fixture
def prefix() -> str:
    return f"igx-test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def nodes(redis_url, prefix):
    """Two limiters on one Redis, as two API nodes would hold them."""
    a, b = RedisRateLimiter(redis_url, prefix=prefix), RedisRateLimiter(redis_url, prefix=prefix)
    yield a, b
    a.close()
    b.close()


def test_two_nodes_share_one_budget(nodes):
    a, b = nodes
    assert isinstance(a, Limiter)
    answers = [(a if i % 2 else b).hit("key-1", 10, now=500.0) for i in range(14)]
    assert answers[:10] == [None] * 10  # the burst is 10 in all, not 10 per node
    assert answers[10:] == [pytest.approx(0.1)] * 4  # a token comes back every 0.1 s
    assert a.hit("key-1", 10, now=500.25) is None  # 2.5 tokens refilled ...
    assert b.hit("key-1", 10, now=500.25) is None
    assert a.hit("key-1", 10, now=500.25) == pytest.approx(0.05)  # ... half a token left
    assert b.hit("key-2", 10, now=500.25) is None  # other keys have their own budget


def test_the_server_clock_is_used_when_no_time_is_given(nodes):
    a, b = nodes
    assert [a.hit("k", 2) for _ in range(2)] == [None, None]
    wait = b.hit("k", 2)
    assert wait is not None and 0.4 < wait <= 0.5  # the Redis server's clock has moved a little at most


def test_keys_expire_once_the_bucket_is_full_again(nodes, redis_url, prefix):
    a, _ = nodes
    client = redis.Redis.from_url(redis_url)
    a.hit("fast", 20)  # burst 20, refills at 20/s: full again within 1 s
    a.hit("slow", 0.5)  # burst 1, refills at 0.5/s: full again within 2 s
    assert 900 < client.pttl(prefix + "fast") <= 1001
    assert 1900 < client.pttl(prefix + "slow") <= 2001
    time.sleep(1.1)
    assert not client.exists(prefix + "fast")
    assert client.exists(prefix + "slow")
    client.close()


# One hit: key, rate, and the time step since the previous hit.
_hits = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from([0.5, 1.0, 3.0, 10.0, 200.0]),
        st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.5, 2.0]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(hits=_hits)
def test_redis_answers_like_the_in_memory_limiter(redis_url, hits):
    shared = RedisRateLimiter(redis_url, prefix=f"igx-test:{uuid.uuid4().hex[:10]}:")
    local = RateLimiter()
    now = 1000.0
    try:
        for key, rate, step in hits:
            now += step
            expected = local.hit(key, rate, now=now)
            got = shared.hit(key, rate, now=now)
            if expected is None:
                assert got is None
            else:
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    finally:
        shared.close()


def test_bad_rates_and_urls_are_refused(nodes):
    a, _ = nodes
    for rate in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            a.hit("k", rate)
    with pytest.raises(ValueError):
        open_limiter("memcached://127.0.0.1:11211")
    assert isinstance(open_limiter(""), RateLimiter)


# --- Redis down ----------------------------------------------------------------------------------------


class _RedisProcess:
    """A private redis-server on a free port, to stop and start again (the shared one stays up)."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is needed for the Redis outage test")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path):
    server = _RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_down_falls_back_to_this_nodes_buckets_and_recovers(own_redis, caplog):
    limiter = RedisRateLimiter(own_redis.url, prefix="k:", retry_s=0.2)
    client = redis.Redis.from_url(own_redis.url)
    assert limiter.hit("key", 2, now=10.0) is None
    assert client.exists("k:key")  # counted in Redis

    own_redis.stop()
    caplog.set_level(logging.WARNING, logger="imagegenx.api.ratelimit")
    started = time.monotonic()
    answers = [limiter.hit("key", 2, now=10.0) for _ in range(5)]
    assert time.monotonic() - started < 1.0  # an outage costs no request more than a refused connect
    assert answers[:2] == [None, None]  # fail open, to this node's own budget (burst 2) ...
    assert answers[2:] == [pytest.approx(0.5)] * 3  # ... which still limits
    errors = limiter.registry.get_sample_value("imagegenx_rate_limit_redis_errors_total")
    assert errors == 1  # one failure; then Redis is skipped for retry_s
    assert len([r for r in caplog.records if "Redis unreachable" in r.getMessage()]) == 1

    own_redis.start()  # empty again: the server keeps nothing on disk
    time.sleep(0.25)
    assert limiter.hit("key", 2, now=20.0) is None
    assert client.exists("k:key")  # back on the shared budget
    limiter.close()
    client.close()
