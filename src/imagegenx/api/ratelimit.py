"""Per-key request rate limits: token buckets in memory or in Redis, behind a small ``Limiter`` protocol.

The ImageGenX seed limits paid users to 200 requests/s and free users to 30 requests/s (per API key
here; ``ApiKey.rate_limit_per_s`` carries the number). One process keeps its buckets in memory
(``RateLimiter``); several API nodes share one budget per key through Redis (``RedisRateLimiter``,
chosen by ``ServiceSettings.rate_limit_url``; ``open_limiter`` picks).

A bucket holds up to ``burst = max(1, rate)`` tokens and refills at ``rate`` tokens per second; each
request takes one token or is refused with the time until one is there (``Retry-After``). Buckets
live in an LRU map capped at ``max_keys``: the bucket evicted is the one idle longest, which has
usually refilled completely, so forgetting it changes nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter

from imagegenx.types import Tier

__all__ = [
    "DEFAULT_RATES",
    "Limiter",
    "RateLimiter",
    "RedisRateLimiter",
    "open_limiter",
    "retry_after_header",
]

log = logging.getLogger(__name__)

# Requests per second by tier, from the seed (used where a key carries no rate of its own).
DEFAULT_RATES: dict[Tier, float] = {Tier.FREE: 30.0, Tier.PAID: 200.0}


@runtime_checkable
class Limiter(Protocol):
    def hit(self, key: str, rate_per_s: float, *, now: float | None = None) -> float | None:
        """Take one request for ``key`` at ``rate_per_s``: None if allowed, else seconds to wait."""
        ...

    def close(self) -> None:
        """Release connections; the limiter is not used afterwards."""
        ...


def open_limiter(rate_limit_url: str) -> RateLimiter | RedisRateLimiter:
    """In-process buckets for ``""``, shared Redis buckets for ``redis://`` / ``rediss://`` URLs."""
    if not rate_limit_url:
        return RateLimiter()
    if rate_limit_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimiter(rate_limit_url)
    raise ValueError(
        f"rate_limit_url {rate_limit_url!r}: give a redis:// URL, or nothing for in-process limits"
    )


def _check_rate(rate_per_s: float) -> None:
    if not rate_per_s > 0 or math.isinf(rate_per_s):  # also refuses NaN
        raise ValueError(f"rate_per_s must be a positive finite number, not {rate_per_s!r}")


def retry_after_header(wait_s: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for the wait ``hit`` returned."""
    return str(max(1, math.ceil(wait_s)))


class RateLimiter:
    """Thread-safe in-memory token buckets, one per key, at most ``max_keys`` of them."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, updated_at]

    def __len__(self) -> int:
        return len(self._buckets)

    def close(self) -> None:
        pass

    def hit(self, key: str, rate_per_s: float, *, now: float | None = None) -> float | None:
        _check_rate(rate_per_s)
        burst = max(1.0, rate_per_s)
        with self._lock:
            if now is None:
                now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [burst, now]
                if len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                elapsed = max(0.0, now - bucket[1])  # a clock that steps back refills nothing
                bucket[0] = min(burst, bucket[0] + elapsed * rate_per_s)
                bucket[1] = max(bucket[1], now)
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return None
            return (1.0 - bucket[0]) / rate_per_s


# The same bucket as RateLimiter, in one Redis hash per key, updated atomically by one script.
# ARGV: rate, burst, now ("" = the Redis server's clock, so API nodes with skewed clocks agree).
# A bucket untouched for burst/rate seconds is full again (tokens never go below 0), i.e. the same as no
# bucket: it expires then.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
else
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  ts = math.max(ts, now)
end
local wait = -1
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1)
return string.format('%.17g', wait)
"""


class RedisRateLimiter:
    """Token buckets in Redis, shared by every API node that points at the same server.

    Each ``hit`` is one ``EVALSHA`` of a Lua script (atomic: two nodes never spend one token twice);
    bucket keys are ``<prefix><key>`` and expire once full again, so idle keys cost Redis nothing.

    When Redis fails (down, timed out), requests are NOT refused: the limiter falls back to this
    node's in-memory buckets (the limit then holds per node, so N nodes allow up to N times the rate),
    logs a warning at most every 30 s, counts ``imagegenx_rate_limit_redis_errors_total`` and skips
    Redis for ``retry_s`` before trying again. An outage of the limiter's store must not take the API
    down, and a per-node limit still stops one client flooding a node meanwhile.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "imagegenx:rate:",
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis  # the `scale` extra; imported here so the in-process default needs nothing

        self._errors_types: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self._script = self._client.register_script(_BUCKET_SCRIPT)
        self.prefix = prefix
        self.retry_s = retry_s
        self._clock = clock
        self._fallback = RateLimiter(clock=clock)
        self._down_until = 0.0
        self._last_warning = -math.inf
        self.registry = CollectorRegistry()
        self.redis_errors = Counter(
            "imagegenx_rate_limit_redis_errors",
            "Rate-limit checks that could not reach Redis and used this node's own buckets",
            registry=self.registry,
        )

    def close(self) -> None:
        self._client.close()

    def hit(self, key: str, rate_per_s: float, *, now: float | None = None) -> float | None:
        _check_rate(rate_per_s)
        if self._clock() < self._down_until:
            return self._fallback.hit(key, rate_per_s, now=now)
        burst = max(1.0, rate_per_s)
        args = [repr(float(rate_per_s)), repr(burst), "" if now is None else repr(float(now))]
        try:
            wait = float(self._script(keys=[self.prefix + key], args=args))
        except self._errors_types as error:
            self._redis_failed(error)
            return self._fallback.hit(key, rate_per_s, now=now)
        return None if wait < 0 else wait

    def _redis_failed(self, error: BaseException) -> None:
        self.redis_errors.inc()
        now = self._clock()
        self._down_until = now + self.retry_s
        if now - self._last_warning >= 30.0:
            self._last_warning = now
            log.warning("rate limits: Redis unreachable (%s); using this node's own buckets", error)
