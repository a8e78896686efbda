"""The engine's batch scheduler: which waiting jobs run together, and when.

Plain CPU logic, in the spirit of vLLM v1's scheduler: the worker loop asks it for work, executes it,
and comes back. It never imports torch, numpy or diffusers (an import-linter contract checks this), and
time is always passed in (``now``: seconds on one monotonic clock), so tests drive it without sleeping.

Three rules shape it:

* **Priority lanes with aging.** A job's effective lane is its priority minus one for every ``aging_s``
  it has waited, so a P3 job draws level with fresh P0 work after ``3 * aging_s``: no lane starves.
* **A short collection window.** A batch of the head job's key starts once the head has waited
  ``window_s``, or at once when its key already fills a batch. A few ms of latency buy a fuller UNet
  call, which is where throughput lives (SDXL runs 2.6x the FLOP/s at batch 16 as at batch 2, DESIGN.md).
* **Continuous batching.** The engine owns the denoising loop (DESIGN.md decision 1), so waiting jobs
  of a running batch's key join it at a step boundary (``admit``), unless more urgent work of another
  key waits: then the batch drains, and that work goes next.

The waiting set is scanned in full on each call. Effective lanes change as time passes, so a heap
ordered at insertion would go stale; a scan of a few hundred jobs costs microseconds against an engine
step of tens of milliseconds, and keeps the code obviously right.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from imagegenx.types import BatchKey, JobSpec


@dataclass(frozen=True)
class SchedulerConfig:
    """How long to collect, how fast jobs age, how large a batch may grow.

    With the defaults, 512² → 16, 1024² → 8 and 2048² → 2 images per batch (the ImageGenX seed).
    """

    window_s: float = 0.05  # collect jobs this long after the head arrives before starting a batch
    aging_s: float = 2.0  # every aging_s a job waits, it moves up one priority lane (no starvation)
    max_pixels_per_batch: int = 8 * 1024 * 1024  # memory bound: batch size * width * height
    max_batch: int = 16  # hard cap whatever the resolution

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_s) and self.window_s >= 0):
            raise ValueError(f"window_s must be finite and >= 0, got {self.window_s}")
        if not (math.isfinite(self.aging_s) and self.aging_s > 0):
            raise ValueError(f"aging_s must be finite and > 0, got {self.aging_s}")
        if self.max_pixels_per_batch < 1 or self.max_batch < 1:
            raise ValueError("max_pixels_per_batch and max_batch must be >= 1")


DEFAULT_CONFIG = SchedulerConfig()


@dataclass(frozen=True, slots=True)
class _Waiting:
    job: JobSpec
    arrival: float
    seq: int  # insertion order: the last tie-breaker, so equal arrival times stay first come first served


class BatchScheduler:
    """Holds waiting jobs and hands out batches of one ``BatchKey`` each.

    Guarantees: only jobs with equal keys share a batch; a batch never exceeds ``max_batch_size(key)``
    (nor ``free_slots`` for ``admit``); every job added leaves exactly once, in a batch or by ``cancel``.
    """

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self._by_key: dict[BatchKey, dict[str, _Waiting]] = {}
        self._key_of: dict[str, BatchKey] = {}
        self._shrunk: dict[BatchKey, int] = {}  # limits lowered after a CUDA OOM
        self._seq = itertools.count()

    # -- limits ------------------------------------------------------------------------------------

    def max_batch_size(self, key: BatchKey) -> int:
        """``min(max_batch, max(1, max_pixels_per_batch // (w*h)))``, lowered for a key by ``shrink``."""
        if key.width <= 0 or key.height <= 0:
            raise ValueError(f"width and height must be positive, got {key.width}x{key.height}")
        cfg = self.config
        by_memory = max(1, cfg.max_pixels_per_batch // (key.width * key.height))
        return min(cfg.max_batch, by_memory, self._shrunk.get(key, cfg.max_batch))

    def shrink(self, key: BatchKey, size: int) -> None:
        """After a CUDA OOM, cap batches of ``key`` at ``size`` (>= 1). A limit is never raised again:
        the OOM proved the memory is not there, and a second OOM costs a whole batch of work."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._shrunk[key] = min(size, self._shrunk.get(key, size))

    # -- the waiting set ---------------------------------------------------------------------------

    def add(self, job: JobSpec, now: float) -> None:
        """Start waiting at ``now``. The id must be non-empty and not already waiting."""
        if not job.job_id:
            raise ValueError("job_id must be non-empty")
        if job.job_id in self._key_of:
            raise ValueError(f"job {job.job_id!r} is already waiting")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        key = job.batch_key
        self.max_batch_size(key)  # reject impossible sizes here, not later inside next_batch
        self._by_key.setdefault(key, {})[job.job_id] = _Waiting(job, now, next(self._seq))
        self._key_of[job.job_id] = key

    def cancel(self, job_id: str) -> bool:
        """Remove a waiting job; True if it was waiting. Running jobs are the worker's business."""
        key = self._key_of.pop(job_id, None)
        if key is None:
            return False
        group = self._by_key[key]
        del group[job_id]
        if not group:
            del self._by_key[key]
        return True

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._key_of

    # -- handing out work --------------------------------------------------------------------------

    def next_batch(self, now: float) -> list[JobSpec]:
        """For an idle worker: the head job's batch once it is ready, else ``[]``.

        Ready means the head has waited ``window_s``, or its key already fills a batch. The batch holds
        up to ``max_batch_size(key)`` jobs of the head's key, best (lane, arrival) first."""
        head = self._head(now)
        if head is None or not self._ready(head, now):
            return []
        key = head.job.batch_key
        return self._take(key, self.max_batch_size(key), now)

    def seconds_until_ready(self, now: float) -> float | None:
        """How long an idle worker may sleep if nothing is added: None when empty, 0 when
        ``next_batch`` would return jobs now.

        Never too late; it may be early: until some job steps up a lane the head cannot change, so the
        answer is the sooner of the head's window end and the next lane step. Call again then."""
        head = self._head(now)
        if head is None:
            return None
        if self._ready(head, now):
            return 0.0
        window_end = _first_time(head.arrival + self.config.window_s, lambda t: self._waited_window(head, t))
        at = min(window_end, *(self._next_step(w, now) for w in self._all()))
        return _delay(now, at)

    def admit(self, key: BatchKey, free_slots: int, now: float) -> list[JobSpec]:
        """For a running batch of ``key`` at a step boundary: up to ``free_slots`` waiting jobs of that
        key, best first; no window applies, since the batch runs anyway.

        Returns ``[]`` when the head has another key and a strictly better lane than the best job
        here: new joiners would keep the batch alive and hold that urgent work back indefinitely."""
        group = self._by_key.get(key)
        if free_slots <= 0 or not group:
            return []
        head = self._head(now)
        assert head is not None  # group is non-empty
        best = min(group.values(), key=lambda w: self._rank(w, now))
        if head.job.batch_key != key and self._lane(head, now) < self._lane(best, now):
            return []
        return self._take(key, min(free_slots, self.max_batch_size(key)), now)

    # -- internals ---------------------------------------------------------------------------------

    def _all(self) -> Iterator[_Waiting]:
        return (w for group in self._by_key.values() for w in group.values())

    def _lane(self, w: _Waiting, now: float) -> int:
        return int(w.job.priority) - math.floor((now - w.arrival) / self.config.aging_s)

    def _rank(self, w: _Waiting, now: float) -> tuple[int, float, int]:
        return (self._lane(w, now), w.arrival, w.seq)

    def _head(self, now: float) -> _Waiting | None:
        return min(self._all(), key=lambda w: self._rank(w, now), default=None)

    def _waited_window(self, w: _Waiting, now: float) -> bool:
        return now - w.arrival >= self.config.window_s

    def _ready(self, head: _Waiting, now: float) -> bool:
        key = head.job.batch_key
        return self._waited_window(head, now) or len(self._by_key[key]) >= self.max_batch_size(key)

    def _next_step(self, w: _Waiting, now: float) -> float:
        """The first time after ``now`` at which ``w`` moves up a lane."""
        aging = self.config.aging_s
        steps = math.floor((now - w.arrival) / aging) + 1
        return _first_time(w.arrival + steps * aging, lambda t: math.floor((t - w.arrival) / aging) >= steps)

    def _take(self, key: BatchKey, n: int, now: float) -> list[JobSpec]:
        group = self._by_key[key]
        chosen = heapq.nsmallest(n, group.values(), key=lambda w: self._rank(w, now))
        for w in chosen:
            del group[w.job.job_id]
            del self._key_of[w.job.job_id]
        if not group:
            del self._by_key[key]
        return [w.job for w in chosen]


def _first_time(start: float, ok: Callable[[float], bool]) -> float:
    """The first float from ``start`` up at which ``ok`` holds (``ok`` must be monotonic).

    ``arrival + window_s`` can round to a float at which ``now - arrival >= window_s`` is still false;
    stepping up a few ulps makes the promised time the real moment, so a worker never spins on it."""
    t = start
    while not ok(t):
        t = math.nextafter(t, math.inf)
    return t


def _delay(now: float, at: float) -> float:
    """``at - now``, rounded so that ``now + delay >= at`` holds in floating point too."""
    d = at - now
    while now + d < at:
        d = math.nextafter(d, math.inf)
    return d
