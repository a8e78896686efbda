#!/usr/bin/env python
"""Open-loop load generator for the ImageGenX v1 API: tasks per second end to end, and latency.

Requests are sent on a fixed schedule (Poisson arrivals, or a fixed interval) at ``--rate`` per
second whatever the server does: a slow server does not slow the sender down, so its queue grows
the way a real one would (open loop). Every request's *scheduled* time is recorded; latency is
scheduled time -> the client first sees the task ``succeeded``, so it includes any time the client
itself fell behind, the HTTP round trip, the server's queue and the generation.

Tasks are followed to completion by one poller (GET /api/v1/image/task/{id}, every
``--poll-interval``, 50 ms by default) that scans the unfinished tasks oldest first until
``--poll-lookahead`` (2) of them are still unfinished, plus ``--poll-rotate`` (1) others in turn for
tasks that finish far out of order. The server runs tasks roughly in order, so this sees nearly
every completion within about one interval while costing the server about 3 x 20 polls/s plus one
per completion, however long its queue grows (a poll costs the server about 3 ms of CPU on a 2-core
machine: polling every task every 50 ms would make the load generator a large part of the load).
The SSE endpoint is not used: each open stream waits in a thread of the server's default executor
(6 threads on 2 cores), so with many waiting tasks its events can come seconds late.
``--check-detection`` measures how late completions were seen.

Throughput is the number of tasks seen succeeding inside the measurement window (from ``--warmup``
seconds after the schedule starts to its end) divided by its length; latency percentiles are over
the tasks *scheduled* inside that window, each followed to the end (up to ``--drain-timeout`` after
the schedule; still unfinished then: canceled and counted "unfinished"). HTTP 429 and 503 on submit
count as rejected, not as errors. ``--bucket`` rows show whether latency stays flat (sustained) or
grows (overloaded) through the run.

    python scripts/loadgen.py --url http://127.0.0.1:8000 --key igx_... --rate 20 --duration 30
    python scripts/loadgen.py --start-server random:tiny-sd15 --rate 20 --duration 30 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

# httpx2 (pydantic's maintained httpx, which huggingface_hub and openai moved to): httpx's pool does
# O(connections x requests) work per request, so with a few hundred requests in flight the client
# itself fell seconds behind its schedule (and saw ReadErrors), which read as a stalled server.
import httpx2
from loadgen_report import FINAL, client_fell_behind, engine_counts, engine_summary, print_table, summarize

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Request:
    """One scheduled request. Times are seconds since the schedule's start (t0)."""

    index: int
    scheduled: float
    sent: float | None = None  # the POST left the client
    answered: float | None = None  # the POST's answer arrived
    http_status: int | None = None  # the POST's status code
    error: str | None = None  # a transport error on the POST (exception name)
    task_id: str | None = None
    status: str | None = None  # final task status; "unfinished" if not final by the drain timeout
    done: float | None = None  # when the client first saw the final status
    server_done: float | None = None  # the task's finished_at on the server's clock (--check-detection)

    @property
    def latency(self) -> float | None:
        if self.status != "succeeded" or self.done is None:
            return None
        return self.done - self.scheduled


def arrival_times(rate: float, duration: float, arrivals: str, seed: int) -> list[float]:
    """Offsets (s) in [0, duration) at ``rate`` per second: exponential gaps, or a fixed interval."""
    if arrivals == "fixed":
        return [i / rate for i in range(math.ceil(rate * duration - 1e-9))]
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _cpu_sample(server_pid: int | None) -> dict | None:
    """Busy CPU seconds of the machine, this process and the server (Linux /proc; else None)."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        server = 0.0
        if server_pid is not None:
            with open(f"/proc/{server_pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            server = (int(stat[11]) + int(stat[12])) / hz
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return {
        "time": time.perf_counter(),
        "busy": (sum(fields[:8]) - fields[3] - fields[4]) / hz,  # all but idle and iowait; no guest
        "loadgen": own.user + own.system,
        "server": server,
    }


def cpu_use(before: dict | None, after: dict | None, has_server: bool) -> dict | None:
    """Average cores busy between two samples: everything, the load generator, the server, the rest."""
    if before is None or after is None:
        return None
    seconds = after["time"] - before["time"]
    cores = {k: (after[k] - before[k]) / seconds for k in ("busy", "loadgen", "server")}
    result = {
        "seconds": seconds,
        "machine_cores": os.cpu_count(),
        "busy_cores": cores["busy"],
        "loadgen_cores": cores["loadgen"],
    }
    if has_server:
        result["server_cores"] = cores["server"]
        result["other_cores"] = cores["busy"] - cores["loadgen"] - cores["server"]
    return result


def task_body(a: argparse.Namespace, index: int) -> dict:
    return {
        "text": f"{a.prompt} #{index}",
        "width": a.width,
        "height": a.height,
        "steps": a.steps,
        "cfg_scale": a.cfg,
        "sampler": a.sampler,
        "seed": a.seed * 1_000_003 + index + 1,
        "priority": a.priority,
        **({"model": a.model} if a.model else {}),
        **({"decoder": a.decoder} if a.decoder != "full" else {}),
    }


class LoadGen:
    def __init__(self, client: httpx2.AsyncClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.requests: list[Request] = []
        self.pending: dict[str, Request] = {}  # accepted, not yet seen final
        self.submit_slots = asyncio.Semaphore(args.max_inflight_submits)
        self.poll_errors: Counter[str] = Counter()
        self.polls = 0
        self.t0 = 0.0
        self.stopping = False
        self.interrupted_at: float | None = None  # SIGINT: stop sending, report what was seen
        self.cpu: dict | None = None  # cores busy while the schedule ran
        self.engines: list[dict] = []  # engine_summary of each --metrics-url: the schedule, drained

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def interrupt(self) -> None:
        """SIGINT (a time limit, Ctrl-C): the report covers the requests scheduled so far."""
        if self.interrupted_at is None:
            self.interrupted_at = self.now()

    async def submit(self, req: Request) -> None:
        async with self.submit_slots:  # a cap so high it should never bind; lag shows if it does
            req.sent = self.now()
            try:
                response = await self.client.post(
                    "/api/v1/image/generate", json=task_body(self.args, req.index)
                )
            except httpx2.HTTPError as exc:
                req.answered, req.error = self.now(), type(exc).__name__
                return
            req.answered, req.http_status = self.now(), response.status_code
            if response.status_code == 200:
                try:
                    req.task_id = response.json()["data"]["task_ids"][0]
                except (ValueError, KeyError, IndexError, TypeError):
                    req.error = "unreadable 200 answer"
                    return
                self.pending[req.task_id] = req

    async def poll_one(self, req: Request) -> bool:
        """Ask about one task; true if it is final (now or already)."""
        self.polls += 1
        try:
            response = await self.client.get(f"/api/v1/image/task/{req.task_id}")
        except httpx2.HTTPError as exc:
            self.poll_errors[type(exc).__name__] += 1
            return False
        seen = self.now()
        if response.status_code != 200:
            self.poll_errors[str(response.status_code)] += 1
            return False
        try:
            status = response.json()["data"]["status"]
        except (ValueError, KeyError, TypeError):
            self.poll_errors["unreadable 200 answer"] += 1
            return False
        if status in FINAL and req.status is None:
            req.status, req.done = status, seen
            self.pending.pop(req.task_id, None)
        return status in FINAL

    async def poll_loop(self) -> None:
        """Each tick, scan the unfinished tasks oldest first until ``--poll-lookahead`` are still unfinished.

        A FIFO server finishes the oldest first, so a couple of polls per tick suffice while nothing
        finishes, and a whole finished batch is found in the same tick (the groups double). Looking
        past the first unfinished task catches neighbours that finish out of order (another batch);
        a few others are polled in rotation to catch the rest.
        """
        cursor = 0
        lookahead = self.args.poll_lookahead
        while not self.stopping:
            tick = time.perf_counter()
            waiting = sorted(self.pending.values(), key=lambda r: r.scheduled)
            i, size, unfinished = 0, lookahead, 0
            while i < len(waiting) and unfinished < lookahead:
                group = waiting[i : i + size]
                finished = await asyncio.gather(*(self.poll_one(r) for r in group))
                i, size = i + len(group), 2 * size
                unfinished += finished.count(False)
            rest = waiting[i:]
            if rest and self.args.poll_rotate:
                cursor %= len(rest)
                extra = (rest[cursor:] + rest[:cursor])[: self.args.poll_rotate]
                cursor += len(extra)
                await asyncio.gather(*(self.poll_one(r) for r in extra))
            await asyncio.sleep(max(0.0, tick + self.args.poll_interval - time.perf_counter()))

    async def cancel_unfinished(self) -> None:
        async def cancel(req: Request) -> None:
            req.status = "unfinished"
            with contextlib.suppress(httpx2.HTTPError):
                await self.client.post(f"/api/v1/image/task/{req.task_id}/cancel")

        left = list(self.pending.values())
        self.pending.clear()
        for i in range(0, len(left), 32):
            await asyncio.gather(*(cancel(r) for r in left[i : i + 32]))

    async def check_detection(self) -> None:
        """After the run: each success's finished_at (server clock), to see how late polling saw it."""

        async def one(req: Request) -> None:
            with contextlib.suppress(httpx2.HTTPError, KeyError, TypeError):
                response = await self.client.get(f"/api/v1/image/task/{req.task_id}")
                req.server_done = response.json()["data"]["finished_at"] - self.t0_wall

        done = [r for r in self.requests if r.status == "succeeded"]
        for i in range(0, len(done), 16):
            await asyncio.gather(*(one(r) for r in done[i : i + 16]))

    async def engine_pages(self) -> dict[str, dict[str, float]]:
        """Each ``--metrics-url``'s engine counters now (an unreachable one is left out)."""
        pages = {}
        for url in self.args.metrics_url:
            with contextlib.suppress(httpx2.HTTPError):
                response = await self.client.get(url)
                if response.status_code == 200:
                    pages[url] = engine_counts(response.text)
        return pages

    async def run(self) -> float:
        """Send the schedule, follow every task; the seconds spent draining after the schedule."""
        a = self.args
        before = await self.engine_pages()
        offsets = arrival_times(a.rate, a.duration, a.arrivals, a.seed)
        self.requests = [Request(i, t) for i, t in enumerate(offsets)]
        self.t0 = time.perf_counter() + 0.05
        self.t0_wall = time.time() + 0.05
        cpu_before = _cpu_sample(a.server_pid)
        poller = asyncio.create_task(self.poll_loop())
        submits = []
        for req in self.requests:
            delay = req.scheduled - self.now()
            while delay > 0 and self.interrupted_at is None:
                await asyncio.sleep(min(delay, 0.1))
                delay = req.scheduled - self.now()
            if self.interrupted_at is not None:
                break
            submits.append(asyncio.create_task(self.submit(req)))
        await asyncio.gather(*submits)
        if self.interrupted_at is not None:
            self.requests = self.requests[: len(submits)]
        end_of_schedule = self.now()
        self.cpu = cpu_use(cpu_before, _cpu_sample(a.server_pid), a.server_pid is not None)
        deadline = time.perf_counter() + a.drain_timeout
        while self.pending and time.perf_counter() < deadline and self.interrupted_at is None:
            await asyncio.sleep(0.05)
        self.stopping = True
        await poller
        drained = self.now() - end_of_schedule
        after = await self.engine_pages()  # the schedule's tasks, drained
        self.engines = [engine_summary(url, before[url], after[url]) for url in before if url in after]
        await self.cancel_unfinished()
        return drained


async def _run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    limits = httpx2.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    timeout = httpx2.Timeout(args.http_timeout)
    async with httpx2.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as c:
        gen = LoadGen(c, args)
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, gen.interrupt)
        drained = await gen.run()
        if args.check_detection and gen.interrupted_at is None:
            await gen.check_detection()
    if gen.interrupted_at is not None:
        # Cut short: the figures cover the schedule up to the interrupt (tasks still running count
        # as unfinished), so throughput is not divided by seconds that never ran; an interrupt
        # while draining leaves the schedule's length as it was.
        args.duration = min(args.duration, max(gen.interrupted_at, args.warmup + 1e-3))
    elapsed = args.duration + drained
    summary = summarize(gen.requests, args, drained)
    return {
        "interrupted_at_s": gen.interrupted_at,
        "client_fell_behind": client_fell_behind(summary, gen.cpu),
        "summary": summary,
        "cpu_during_schedule": gen.cpu,
        "engines_during_schedule": gen.engines,
        "polls": gen.polls,
        "polls_per_s": gen.polls / elapsed,
        "poll_errors": dict(gen.poll_errors),
        "requests": [asdict(r) for r in gen.requests],
    }


def start_server(args: argparse.Namespace, root: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from support.server import Server

    env = dict(item.split("=", 1) for item in args.server_env)
    workers = worker_processes(args.server_arg)
    if workers:  # each worker process serves its engine's /metrics on a port of its own
        port = free_port_block(workers)
        env["IMAGEGENX_SERVICE__METRICS_PORT"] = str(port)
        args.metrics_url += [f"http://127.0.0.1:{port + i}/metrics" for i in range(workers)]
    server = Server(root, model=args.start_server, env=env, args=tuple(args.server_arg)).start()
    key = server.key("paid", rate=0.0, quota=1_000_000)  # rate 0: unlimited, polls are not charged
    if not workers:  # the engine runs in the server: its /metrics (the key opens it)
        args.metrics_url.append(f"{server.url}/metrics")
    return server, key


def worker_processes(server_args: list[str]) -> int:
    """How many engine processes `serve` starts with these options (0: the engine runs inside it)."""
    count = 0
    for i, arg in enumerate(server_args):
        if arg == "--worker-process":
            count = max(count, 1)
        elif arg.startswith("--worker-processes="):
            count = int(arg.split("=", 1)[1])
        elif arg == "--worker-processes" and i + 1 < len(server_args):
            count = int(server_args[i + 1])
    return count


def free_port_block(count: int) -> int:
    """A port p with p .. p + count - 1 free now."""
    import socket

    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def warm_up(url: str, key: str, args: argparse.Namespace) -> None:
    """One task before the clock starts, so a lazily loaded model is not in the figures."""
    with httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        response = c.post("/api/v1/image/generate", json=task_body(args, -1))
        response.raise_for_status()
        task_id = response.json()["data"]["task_ids"][0]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if c.get(f"/api/v1/image/task/{task_id}").json()["data"]["status"] in FINAL:
                return
            time.sleep(0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target")
    target.add_argument("--url", help="The server, e.g. http://127.0.0.1:8000")
    target.add_argument("--key", default=os.environ.get("IMAGEGENX_KEY"), help="API key [$IMAGEGENX_KEY]")
    target.add_argument(
        "--start-server",
        metavar="MODEL",
        help="Start `imagegenx serve --model MODEL` (tests/support/server.py: own DB, blobs, port) "
        "and a key for it; stopped at the end",
    )
    target.add_argument("--server-root", type=Path, help="Folder for that server (default: a temp dir)")
    target.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="Extra env for it"
    )
    target.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="Extra `serve` option (--worker-process)",
    )
    target.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        metavar="URL",
        help="An engine's Prometheus page, read before and after the schedule (with --start-server: "
        "each worker's, or the server's /metrics when the engine runs inside it)",
    )
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=float, default=10.0, help="Requests per second [10]")
    load.add_argument("--duration", type=float, default=30.0, help="Seconds of sending [30]")
    load.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="Seconds excluded from the measurement window [min(5, duration/4)]",
    )
    load.add_argument("--bucket", type=int, default=5, help="Seconds per row of the time series [5]")
    load.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson")
    load.add_argument("--seed", type=int, default=0, help="Arrival schedule and image seeds [0]")
    load.add_argument("--no-warm-task", action="store_true", help="Skip the one task sent before t0")
    job = p.add_argument_group("task")
    job.add_argument("--width", type=int, default=64)
    job.add_argument("--height", type=int, default=64)
    job.add_argument("--steps", type=int, default=4)
    job.add_argument("--cfg", type=float, default=7.0, help="cfg_scale; 0 for turbo models [7]")
    job.add_argument("--sampler", default="dpmpp_2m_karras", help="[dpmpp_2m_karras]")
    job.add_argument("--priority", type=int, default=2)
    job.add_argument("--model", help="Model per request (default: the server's)")
    job.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    job.add_argument(
        "--decoder", choices=("full", "tiny"), default="full", help="tiny: the server's tiny decoder [full]"
    )
    client = p.add_argument_group("client")
    client.add_argument("--poll-interval", type=float, default=0.05, help="Seconds between polls [0.05]")
    client.add_argument(
        "--poll-lookahead",
        type=int,
        default=2,
        help="Each tick, poll oldest first until this many are still unfinished [2]",
    )
    client.add_argument("--poll-rotate", type=int, default=1, help="Other tasks polled each tick [1]")
    client.add_argument("--connections", type=int, default=512, help="HTTP connection cap [512]")
    client.add_argument("--max-inflight-submits", type=int, default=512, help="POSTs in flight cap [512]")
    client.add_argument("--http-timeout", type=float, default=60.0)
    client.add_argument(
        "--drain-timeout", type=float, default=300.0, help="Seconds to follow tasks after the schedule"
    )
    client.add_argument(
        "--check-detection",
        action="store_true",
        help="After the run, compare when each success was seen with its finished_at (same clock only)",
    )
    p.add_argument("--json", type=Path, help="Write the report (summary and every request) here")
    args = p.parse_args(argv)
    args.server_pid = None  # set by --start-server: its CPU use is reported
    if not args.start_server and not args.url:
        p.error("give --url (and --key) or --start-server MODEL")
    if args.rate <= 0 or args.duration <= 0 or args.bucket < 1 or args.poll_lookahead < 1:
        p.error("--rate and --duration must be > 0, --bucket and --poll-lookahead >= 1")
    if args.warmup is None:
        args.warmup = min(5.0, args.duration / 4)
    if not 0 <= args.warmup < args.duration:
        p.error("--warmup must be in [0, duration)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    server = None
    tmp = None
    setup_started = time.monotonic()
    try:
        if args.start_server:
            root = args.server_root
            if root is None:
                # A worker process may still be writing results as the server stops.
                tmp = tempfile.TemporaryDirectory(prefix="loadgen-", ignore_cleanup_errors=True)
                root = Path(tmp.name)
            root.mkdir(parents=True, exist_ok=True)
            server, args.key = start_server(args, root)
            args.url, args.server_pid = server.url, server.proc.pid
            print(f"server ready in {time.monotonic() - setup_started:.1f} s", file=sys.stderr)
        if not args.no_warm_task:
            warm_up(args.url, args.key, args)
            print(f"warm-up task done at {time.monotonic() - setup_started:.1f} s", file=sys.stderr)
        report = asyncio.run(_run(args))
    except KeyboardInterrupt:
        # A time limit that ends the run before its schedule began has nothing to report.
        sys.exit(f"interrupted {time.monotonic() - setup_started:.1f} s in, before the schedule started")
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    report["config"] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "key"
    }
    report["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": loadavg,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "started": started,
    }
    if args.json:  # before the table: a closed stdout must not lose the report
        args.json.write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


if __name__ == "__main__":
    main()
