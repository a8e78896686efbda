"""Tests for the batch scheduler: one example per rule, then Hypothesis.

The state machine checks every call against a brute-force reading of the rules (rank every waiting job
by (effective lane, arrival, insertion), take the head's key), plus the bookkeeping invariants: no job
lost or duplicated, batches within their limit and of one key. The starvation property runs a worker
against an endless P0 stream and bounds how long one P3 job waits.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from imagegenx.engine.scheduler import BatchScheduler, SchedulerConfig
from imagegenx.types import BatchKey, JobSpec, LoraRef, Priority, Task


def make_job(job_id: str, key: BatchKey | None = None, priority: Priority = Priority.P2) -> JobSpec:
    key = key or KEY_512
    return JobSpec(
        prompt=f"prompt {job_id}",
        model=key.model,
        width=key.width,
        height=key.height,
        task=key.task,
        loras=key.loras,
        priority=priority,
        job_id=job_id,
    )


KEY_512 = BatchKey("sd15", 512, 512, Task.TEXT2IMG)
KEY_1024 = BatchKey("sdxl", 1024, 1024, Task.TEXT2IMG)
KEY_2048 = BatchKey("sdxl", 2048, 2048, Task.TEXT2IMG)


def ids(jobs: list[JobSpec]) -> list[str]:
    return [j.job_id for j in jobs]


# -- examples ----------------------------------------------------------------------------------------


def test_default_batch_sizes_follow_the_seed():
    s = BatchScheduler()
    assert s.max_batch_size(KEY_512) == 16
    assert s.max_batch_size(KEY_1024) == 8
    assert s.max_batch_size(KEY_2048) == 2
    assert s.max_batch_size(BatchKey("sd15", 64, 64, Task.TEXT2IMG)) == 16  # max_batch caps tiny images
    assert s.max_batch_size(BatchKey("sdxl", 4096, 4096, Task.TEXT2IMG)) == 1  # never below one


def test_waits_for_the_window_before_starting_a_batch():
    s = BatchScheduler(SchedulerConfig(window_s=0.05))
    assert s.seconds_until_ready(0.0) is None
    s.add(make_job("a"), now=1.0)
    assert s.next_batch(1.01) == []
    assert s.seconds_until_ready(1.01) == pytest.approx(0.04)
    s.add(make_job("b"), now=1.02)
    assert s.next_batch(1.04) == []
    assert s.seconds_until_ready(1.05) == 0.0
    assert ids(s.next_batch(1.05)) == ["a", "b"]
    assert len(s) == 0


def test_seconds_until_ready_lands_on_the_ready_moment():
    s = BatchScheduler()
    s.add(make_job("a"), now=0.1)
    wait = s.seconds_until_ready(0.1)
    assert wait is not None and wait > 0
    assert ids(s.next_batch(0.1 + wait)) == ["a"]


def test_seconds_until_ready_wakes_the_worker_when_aging_changes_the_head():
    s = BatchScheduler(SchedulerConfig(window_s=0.5, aging_s=1.0))
    s.add(make_job("old", KEY_1024, Priority.P1), now=0.0)
    s.add(make_job("fresh", KEY_512, Priority.P0), now=0.8)
    assert s.next_batch(0.8) == []  # the head is the fresh P0 job, in its window until 1.3
    wait = s.seconds_until_ready(0.8)
    assert wait == pytest.approx(0.2)  # at 1.0 the old job reaches lane 0 and, being older, leads
    assert ids(s.next_batch(0.8 + wait)) == ["old"]


def test_a_job_put_back_with_its_arrival_time_keeps_its_place():
    """After a CUDA OOM the engine shrinks the key and re-adds the jobs with their first arrival."""
    s = BatchScheduler()
    s.add(make_job("late", KEY_1024), now=5.0)
    s.add(make_job("retry", KEY_1024), now=1.0)
    assert ids(s.next_batch(5.0)) == ["retry", "late"]


def test_a_full_batch_starts_immediately():
    s = BatchScheduler()
    for i in range(17):
        s.add(make_job(f"j{i:02}"), now=0.0)
    assert s.seconds_until_ready(0.0) == 0.0
    assert ids(s.next_batch(0.0)) == [f"j{i:02}" for i in range(16)]
    assert s.next_batch(0.0) == []  # the 17th waits for its window
    assert ids(s.next_batch(0.05)) == ["j16"]


def test_batches_respect_the_size_limit():
    s = BatchScheduler()
    for i in range(20):
        s.add(make_job(f"j{i:02}", KEY_1024), now=0.0)
    assert [len(s.next_batch(0.0)), len(s.next_batch(0.0)), len(s.next_batch(0.0))] == [8, 8, 0]
    assert len(s.next_batch(0.05)) == 4


def test_priority_orders_jobs_within_and_across_keys():
    s = BatchScheduler()
    s.add(make_job("normal", KEY_512, Priority.P2), now=0.0)
    s.add(make_job("paid", KEY_512, Priority.P1), now=0.01)
    s.add(make_job("urgent", KEY_1024, Priority.P0), now=0.02)
    assert ids(s.next_batch(0.1)) == ["urgent"]  # the head's key decides the batch
    assert ids(s.next_batch(0.1)) == ["paid", "normal"]  # lane first, then arrival


def test_aging_lifts_a_waiting_job_one_lane_per_aging_period():
    s = BatchScheduler(SchedulerConfig(aging_s=2.0))
    s.add(make_job("test", KEY_2048, Priority.P3), now=0.0)
    s.add(make_job("u1", KEY_512, Priority.P0), now=5.5)
    assert ids(s.next_batch(5.6)) == ["u1"]  # after 5.6 s the P3 job is in lane 1
    s.add(make_job("u2", KEY_512, Priority.P0), now=5.95)
    assert ids(s.next_batch(6.0)) == ["test"]  # after 6 s: lane 0, and older than u2


def test_shrink_lowers_the_limit_for_one_key_only():
    s = BatchScheduler()
    s.shrink(KEY_1024, 3)
    s.shrink(KEY_1024, 5)  # never raised again
    assert s.max_batch_size(KEY_1024) == 3
    assert s.max_batch_size(KEY_512) == 16
    for i in range(4):
        s.add(make_job(f"j{i}", KEY_1024), now=0.0)
    assert ids(s.next_batch(0.0)) == ["j0", "j1", "j2"]  # three fill the shrunk batch: no wait
    with pytest.raises(ValueError):
        s.shrink(KEY_1024, 0)


def test_admit_fills_free_slots_without_waiting_for_the_window():
    s = BatchScheduler()
    s.add(make_job("a1", KEY_512), now=1.0)
    s.add(make_job("b1", KEY_1024), now=1.0)
    s.add(make_job("a2", KEY_512), now=1.0)
    s.add(make_job("a3", KEY_512), now=1.0)
    assert s.admit(KEY_512, 0, now=1.0) == []
    assert ids(s.admit(KEY_512, 2, now=1.0)) == ["a1", "a2"]
    assert s.admit(KEY_2048, 4, now=1.0) == []
    assert ids(s.admit(KEY_512, 4, now=1.0)) == ["a3"]
    assert "b1" in s


def test_admit_drains_the_batch_when_other_work_is_more_urgent():
    s = BatchScheduler()
    s.add(make_job("normal", KEY_512, Priority.P2), now=0.0)
    s.add(make_job("urgent", KEY_1024, Priority.P0), now=0.0)
    assert s.admit(KEY_512, 4, now=0.0) == []  # let the running 512² batch finish; urgent goes next
    s.add(make_job("paid", KEY_1024, Priority.P1), now=0.0)
    assert ids(s.next_batch(0.05)) == ["urgent", "paid"]
    s.add(make_job("also-normal", KEY_1024, Priority.P2), now=0.1)
    assert ids(s.admit(KEY_512, 4, now=0.1)) == ["normal"]  # equal lanes: joining is fine


def test_cancel_removes_a_waiting_job_once():
    s = BatchScheduler()
    s.add(make_job("a"), now=0.0)
    s.add(make_job("b"), now=0.0)
    assert "a" in s and len(s) == 2
    assert s.cancel("a") is True
    assert s.cancel("a") is False
    assert s.cancel("never-added") is False
    assert "a" not in s and len(s) == 1
    assert ids(s.next_batch(1.0)) == ["b"]
    assert s.cancel("b") is False  # already handed out


def test_add_rejects_empty_and_duplicate_ids():
    s = BatchScheduler()
    with pytest.raises(ValueError):
        s.add(make_job(""), now=0.0)
    s.add(make_job("a"), now=0.0)
    with pytest.raises(ValueError):
        s.add(make_job("a"), now=0.0)
    assert ids(s.next_batch(1.0)) == ["a"]
    s.add(make_job("a"), now=2.0)  # unique among *waiting* jobs: a retry may reuse its id
    assert len(s) == 1


@pytest.mark.parametrize(
    "kwargs", [{"window_s": -1.0}, {"aging_s": 0.0}, {"aging_s": math.inf}, {"max_batch": 0}]
)
def test_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


# -- stateful: every call against a brute-force reading of the rules ----------------------------------

KEYS = [
    KEY_512,
    BatchKey("sd15", 512, 512, Task.IMG2IMG),
    BatchKey("sd15", 512, 512, Task.TEXT2IMG, (LoraRef("ink", 0.8),)),
    BatchKey("sd15", 768, 512, Task.INPAINT),
    KEY_1024,
    KEY_2048,
]
time_steps = st.one_of(st.just(0.0), st.floats(0.0, 0.2), st.floats(0.0, 3.0))


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        window_s=st.sampled_from([0.0, 0.05, 0.5]),
        aging_s=st.sampled_from([0.1, 1.0, 2.0]),
        max_pixels=st.sampled_from([1024 * 1024, 4 * 1024 * 1024]),
        max_batch=st.integers(1, 6),
    )
    def start(self, window_s, aging_s, max_pixels, max_batch):
        self.config = SchedulerConfig(window_s, aging_s, max_pixels, max_batch)
        self.s = BatchScheduler(self.config)
        self.now = 0.0
        self.added: dict[str, tuple[JobSpec, float, int]] = {}  # id -> (job, arrival, insertion)
        self.waiting: set[str] = set()
        self.returned: set[str] = set()
        self.cancelled: set[str] = set()
        self.shrunk: dict[BatchKey, int] = {}

    # The rules as the brief states them, written the slow, obvious way.
    def limit(self, key: BatchKey) -> int:
        cfg = self.config
        return min(cfg.max_batch, max(1, cfg.max_pixels_per_batch // (key.width * key.height)),
                   self.shrunk.get(key, cfg.max_batch))  # fmt: skip

    def lane(self, job_id: str, now: float) -> int:
        job, arrival, _ = self.added[job_id]
        return int(job.priority) - math.floor((now - arrival) / self.config.aging_s)

    def ranked(self, now: float, key: BatchKey | None = None) -> list[str]:
        jobs = [i for i in self.waiting if key is None or self.added[i][0].batch_key == key]
        return sorted(jobs, key=lambda i: (self.lane(i, now), self.added[i][1], self.added[i][2]))

    def ready(self, now: float) -> bool:
        if not self.waiting:
            return False
        head = self.ranked(now)[0]
        key = self.added[head][0].batch_key
        waited = now - self.added[head][1] >= self.config.window_s
        return waited or len(self.ranked(now, key)) >= self.limit(key)

    def hand_out(self, batch: list[JobSpec], limit: int) -> None:
        assert len(batch) <= limit
        assert len({j.batch_key for j in batch}) <= 1
        for j in batch:
            assert j.job_id in self.waiting and j.job_id not in self.returned
            self.waiting.remove(j.job_id)
            self.returned.add(j.job_id)

    @rule(
        key=st.sampled_from(KEYS),
        priority=st.sampled_from(Priority),
        dt=time_steps,
        backdate=st.one_of(st.just(0.0), st.just(0.05), st.floats(0.0, 3.0)),
    )
    def add(self, key, priority, dt, backdate):
        """A job arrives; ``backdate``: one put back after an OOM, with its original arrival time."""
        self.now += dt
        job_id, arrival = f"j{len(self.added)}", self.now - backdate
        self.s.add(make_job(job_id, key, priority), arrival)
        self.added[job_id] = (make_job(job_id, key, priority), arrival, len(self.added))
        self.waiting.add(job_id)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def add_duplicate_is_refused(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.waiting)))
        with pytest.raises(ValueError):
            self.s.add(make_job(job_id), self.now)

    @precondition(lambda self: self.added)
    @rule(data=st.data())
    def cancel(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.added)))
        assert self.s.cancel(job_id) == (job_id in self.waiting)
        if job_id in self.waiting:
            self.waiting.remove(job_id)
            self.cancelled.add(job_id)

    @rule(dt=time_steps)
    def next_batch(self, dt):
        self.now += dt
        expected: list[str] = []
        if self.ready(self.now):
            key = self.added[self.ranked(self.now)[0]][0].batch_key
            expected = self.ranked(self.now, key)[: self.limit(key)]
        limit = self.limit(self.added[expected[0]][0].batch_key) if expected else 0
        batch = self.s.next_batch(self.now)
        assert ids(batch) == expected
        self.hand_out(batch, limit)

    @rule(key=st.sampled_from(KEYS), free_slots=st.integers(0, 8), dt=time_steps)
    def admit(self, key, free_slots, dt):
        self.now += dt
        compatible = self.ranked(self.now, key)
        expected = compatible[: min(free_slots, self.limit(key))]
        if compatible:
            head = self.ranked(self.now)[0]
            if self.added[head][0].batch_key != key and self.lane(head, self.now) < self.lane(
                compatible[0], self.now
            ):
                expected = []
        batch = self.s.admit(key, free_slots, self.now)
        assert ids(batch) == expected
        self.hand_out(batch, min(free_slots, self.limit(key)))

    @rule(key=st.sampled_from(KEYS), size=st.integers(1, 4))
    def shrink(self, key, size):
        self.s.shrink(key, size)
        self.shrunk[key] = min(size, self.shrunk.get(key, size))

    @rule(fraction=st.floats(0.0, 0.999))
    def sleep_until_ready(self, fraction):
        """An idle worker sleeps as long as it is told: nothing may become ready before then."""
        wait = self.s.seconds_until_ready(self.now)
        if not self.waiting:
            assert wait is None
            return
        assert wait is not None
        if self.ready(self.now):
            assert wait == 0.0
            return
        assert wait > 0
        earlier = self.now + wait * fraction
        if earlier < self.now + wait:  # a wait of a few ulps can round "earlier" up to the moment itself
            assert not self.ready(earlier)
        self.now += wait

    @invariant()
    def nothing_lost_or_duplicated(self):
        if not hasattr(self, "s"):
            return
        assert self.waiting | self.returned | self.cancelled == set(self.added)
        assert len(self.waiting) + len(self.returned) + len(self.cancelled) == len(self.added)
        assert len(self.s) == len(self.waiting)
        assert all(i in self.s for i in self.waiting)
        assert not any(i in self.s for i in self.returned | self.cancelled)

    @invariant()
    def limits_match_the_rule(self):
        if hasattr(self, "s"):
            assert all(self.s.max_batch_size(k) == self.limit(k) for k in KEYS)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- starvation --------------------------------------------------------------------------------------

TICK = 1 / 1024  # simulated times are multiples of 1/1024 s: exact in binary, so the bound is exact too


@settings(max_examples=100, deadline=None)
@given(
    aging_s=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    p3_arrives=st.integers(0, 1024),  # ticks: up to 1 s into the stream
    gaps=st.lists(st.integers(8, 12), min_size=1, max_size=20),  # ticks between P0 arrivals, ~10 ms
    durations=st.lists(st.integers(20, 120), min_size=1, max_size=20),  # ticks per batch, 20-117 ms
)
def test_a_p3_job_is_not_starved_by_an_endless_p0_stream(aging_s, p3_arrives, gaps, durations):
    """A worker runs batches for drawn durations while P0 jobs of key A arrive every ~10 ms forever.

    Bound on the P3 job's wait: ``3 * aging_s + window_s + 2 * D`` (D: the longest batch). Why:
    * A P0 job arriving at or after ``t3 = arrival + 3 * aging_s`` never ranks ahead of the P3 job: its
      lane is at least the P3 job's (it has aged at least 3 periods less) and it is younger.
    * The worker keeps up: a 512² batch takes 16 jobs, and at most 16 arrive during one batch
      (gaps >= 8 ticks, D <= 120 ticks), or during a window; so at most 16 P0 jobs wait when it looks.
    * So after ``t3`` it finishes the batch it runs (<= D), may wait out one window for a fresh head,
      runs at most one batch holding the older P0 jobs (<= D), and then the P3 job's batch starts.
    """
    config = SchedulerConfig(window_s=64 * TICK, aging_s=aging_s)  # 62.5 ms: a binary-exact window
    s = BatchScheduler(config)
    longest = max(durations) * TICK
    bound = 3 * aging_s + config.window_s + 2 * longest
    p3_at = p3_arrives * TICK
    p3 = make_job("p3", KEY_2048, Priority.P3)
    stream = itertools.accumulate(itertools.cycle(gaps))
    run_times = itertools.cycle(durations)

    next_p0 = next(stream)
    p3_added = False
    now = 0.0
    while True:
        while next_p0 * TICK <= now or (not p3_added and p3_at <= now):
            if not p3_added and p3_at <= next_p0 * TICK:
                s.add(p3, p3_at)
                p3_added = True
            else:
                s.add(make_job(f"a{next_p0}", KEY_512, Priority.P0), next_p0 * TICK)
                next_p0 = next(stream)
        batch = s.next_batch(now)
        if p3 in batch:
            waited = now - p3_at
            assert batch == [p3]
            assert waited <= bound
            assert waited >= 3 * aging_s  # P0 jobs wait all along, so it had to climb to their lane
            return
        assert not p3_added or now - p3_at <= bound, f"P3 job still waiting after {now - p3_at:.3f} s"
        if batch:
            now += next(run_times) * TICK
        else:
            wait = s.seconds_until_ready(now)
            upcoming = min(next_p0 * TICK, math.inf if p3_added else p3_at)
            now = upcoming if wait is None else min(now + wait, upcoming)
