"""Per-key request rate limits: token buckets in memory, behind a small ``Limiter`` protocol.

The ImageGenX seed limits paid users to 200 requests/s and free users to 30 requests/s (per API key
here; ``ApiKey.rate_limit_per_s`` carries the number). One process keeps its buckets in memory; a
deployment with several API nodes can swap in a Redis-backed ``Limiter`` with the same ``hit``.

A bucket holds up to ``burst = max(1, rate)`` tokens and refills at ``rate`` tokens per second; each
request takes one token or is refused with the time until one is there (``Retry-After``). Buckets
live in an LRU map capped at ``max_keys``: the bucket evicted is the one idle longest, which has
usually refilled completely, so forgetting it changes nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from imagegenx.types import Tier

__all__ = ["DEFAULT_RATES", "Limiter", "RateLimiter", "retry_after_header"]

# Requests per second by tier, from the seed (used where a key carries no rate of its own).
DEFAULT_RATES: dict[Tier, float] = {Tier.FREE: 30.0, Tier.PAID: 200.0}


@runtime_checkable
class Limiter(Protocol):
    def hit(self, key: str, rate_per_s: float, *, now: float | None = None) -> float | None:
        """Take one request for ``key`` at ``rate_per_s``: None if allowed, else seconds to wait."""
        ...


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

    def hit(self, key: str, rate_per_s: float, *, now: float | None = None) -> float | None:
        if not rate_per_s > 0 or math.isinf(rate_per_s):  # also refuses NaN
            raise ValueError(f"rate_per_s must be a positive finite number, not {rate_per_s!r}")
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
