#!/usr/bin/env python
"""Soak: N tasks through a real `imagegenx serve` on a tiny model, and an account of every one.

The mix (by a seeded random draw per task): normal text-to-image tasks, tasks cancelled a moment
after they are accepted, invalid requests (each must be refused with a 4xx and a reason), and
low-priority tasks sent faster than the server runs them, so the queue fills: submissions then get
429/503 with Retry-After and queued tasks past ``--ttl`` expire. At the end every task is accounted
for: succeeded, failed with a reason, canceled, expired, refused as invalid, or rejected while the
queue was full; any other outcome (a 5xx, a task never final, a failure without a reason, an
invalid request accepted) is an error and the exit status is 1.

The server process is measured at the start (after a warm-up task), after the first half of the
tasks and at the end (each after the queue drained and 6 s idle): resident memory (RSS), open files,
sockets and threads, read from /proc. Pools (HTTP worker threads, one SQLite connection per thread)
grow to their size in the first half; a leak shows as growth from "half" to "end". RSS samples taken
while submissions are refused in the second half show whether memory stays flat under overload.

    python scripts/soak.py --tasks 300                    # the CI form (tests/test_reliability_soak.py)
    python scripts/soak.py --tasks 10000 --json soak.json # the full soak (RELIABILITY.md has figures)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("succeeded", "failed", "canceled", "expired")
KEEPALIVE_IDLE_S = 6.0  # uvicorn closes a keep-alive connection idle for 5 s (its default)
BODY = {"width": 64, "height": 64, "steps": 1}
# Requests the server must refuse with a 4xx; the words its message must contain.
INVALID = [
    ({"text": "x", "width": 65}, "multiple of 8"),
    ({"text": ""}, "text"),
    ({"text": "x", "steps": 0}, "steps"),
    ({"text": "x", "callback_url": "http://169.254.169.254/"}, "link-local"),
    ({"text": "x", "image": base64.b64encode(b"not an image").decode()}, "not a readable image"),
]


def process_stats(pid: int) -> dict:
    """RSS (MiB), threads, open files and sockets of a process, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
    sockets = sum(link.startswith("socket:") for link in links)
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "open_files": len(links) - sockets,
        "sockets": sockets,
    }


class Soak:
    def __init__(self, client: httpx.AsyncClient, args: argparse.Namespace, pid: int | None) -> None:
        self.client, self.args, self.pid = client, args, pid
        self.body = BODY | {"steps": args.steps}  # what every request starts from
        self.rng = random.Random(args.seed)
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.accepted: dict[str, str] = {}  # task id -> kind
        self.busy_rss: list[float] = []  # RSS while submissions were refused (second half)
        self.busy_codes: Counter[int] = Counter()
        self.cancels: list[asyncio.Task] = []

    def kind(self) -> str:
        draw = self.rng.random()
        a = self.args
        if draw < a.invalid:
            return "invalid"
        if draw < a.invalid + a.cancel:
            return "cancel"
        if draw < a.invalid + a.cancel + a.burst:
            return "burst"
        return "normal"

    async def one(self, index: int, kind: str) -> None:
        if kind == "invalid":
            body, words = INVALID[index % len(INVALID)]
            path = "/api/v1/image/img2img" if "image" in body else "/api/v1/image/generate"
            response = await self.client.post(path, json=self.body | body)
            message = response.json().get("message", "") if response.status_code < 500 else response.text
            if 400 <= response.status_code < 500 and response.status_code != 429 and words in message:
                self.outcomes["refused_invalid"] += 1
            elif response.status_code in (429, 503):
                self.outcomes["rejected_busy"] += 1
            else:
                self.errors.append(f"invalid request {body} answered {response.status_code}: {message[:200]}")
            return
        priority = 3 if kind == "burst" else 2
        body = self.body | {"text": f"soak {index} {kind}", "seed": max(index, 0), "priority": priority}
        response = await self.client.post("/api/v1/image/generate", json=body)
        if response.status_code in (429, 503):
            if "Retry-After" not in response.headers:
                self.errors.append(f"{response.status_code} without Retry-After")
            self.outcomes["rejected_busy"] += 1
            self.busy_codes[response.status_code] += 1
            if self.pid and index >= self.args.tasks // 2 and len(self.busy_rss) < 1000:
                self.busy_rss.append(process_stats(self.pid)["rss_mib"])
            return
        if response.status_code != 200:
            self.errors.append(f"task {index} ({kind}): {response.status_code} {response.text[:200]}")
            return
        task_id = response.json()["data"]["task_ids"][0]
        self.accepted[task_id] = kind
        if kind == "cancel":
            self.cancels.append(asyncio.create_task(self.cancel_later(task_id)))

    async def cancel_later(self, task_id: str) -> None:
        await asyncio.sleep(self.rng.uniform(0, 0.3))
        try:
            response = await self.client.post(f"/api/v1/image/task/{task_id}/cancel")
        except httpx.TransportError:  # a kept-alive connection the server closed just then: once more
            response = await self.client.post(f"/api/v1/image/task/{task_id}/cancel")
        if response.status_code not in (200, 409):
            self.errors.append(f"cancel {task_id} answered {response.status_code}: {response.text[:200]}")

    async def send(self, indices: range) -> None:
        """Open loop at ``--rate`` per second, at most ``--concurrency`` requests in flight."""
        gate = asyncio.Semaphore(self.args.concurrency)
        start = time.monotonic()

        async def guarded(index: int, kind: str) -> None:
            async with gate:
                try:
                    await self.one(index, kind)
                except httpx.HTTPError as exc:
                    self.errors.append(f"task {index}: {type(exc).__name__}")

        pending = []
        for n, index in enumerate(indices):
            delay = start + n / self.args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(guarded(index, self.kind())))
        await asyncio.gather(*pending)
        await asyncio.gather(*self.cancels)

    async def statuses(self) -> dict[str, dict]:
        """Every task of this key, from the history pages (one request per 100 tasks)."""
        found: dict[str, dict] = {}
        page = 1
        while True:
            response = await self.client.get("/api/v1/image/tasks", params={"page": page, "page_size": 100})
            data = response.json()["data"]
            found.update({item["task_id"]: item for item in data["items"]})
            if page * 100 >= data["total"]:
                return found
            page += 1

    async def drain(self) -> dict[str, dict]:
        deadline = time.monotonic() + self.args.drain_timeout
        while True:
            found = await self.statuses()
            open_ = [t for t in self.accepted if found.get(t, {}).get("status") not in FINAL]
            if not open_ or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)

    def account(self, found: dict[str, dict]) -> None:
        for task_id, kind in self.accepted.items():
            view = found.get(task_id)
            status = view["status"] if view else "missing"
            if status not in FINAL:
                self.errors.append(f"task {task_id} ({kind}) is {status} at the end")
                continue
            if status == "failed" and not view.get("error"):
                self.errors.append(f"task {task_id} failed without a reason")
            if status == "canceled" and kind != "cancel":
                self.errors.append(f"task {task_id} ({kind}) canceled, though nobody asked")
            self.outcomes[status] += 1


async def run(url: str, key: str, args: argparse.Namespace, pid: int | None) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        soak = Soak(client, args, pid)
        await soak.one(-1, "normal")  # warm-up: the model loads before the figures start
        await soak.drain()
        soak.accepted.clear()
        soak.outcomes.clear()
        stats = [process_stats(pid)] if pid else []
        started = time.monotonic()
        half = args.tasks // 2
        for indices in (range(half), range(half, args.tasks)):  # pools grow in the first half only
            await soak.send(indices)
            found = await soak.drain()
            # Idle past uvicorn's 5-s keep-alive timeout: the client pool's idle connections are
            # closed by the server, so what is left open is the server's own, and threads park.
            await asyncio.sleep(KEEPALIVE_IDLE_S)
            stats += [process_stats(pid)] if pid else []
        drained = time.monotonic() - started
        soak.account(found)
    counted = sum(soak.outcomes.values())
    if counted != args.tasks:
        soak.errors.append(f"{counted} outcomes for {args.tasks} tasks")
    return {
        "tasks": args.tasks,
        "outcomes": dict(soak.outcomes),
        "busy_codes": {str(k): v for k, v in soak.busy_codes.items()},
        "errors": soak.errors[:50],
        "error_count": len(soak.errors),
        "total_s": round(drained, 1),
        "server": dict(zip(("start", "half", "end"), stats, strict=False)),
        "rss_while_busy_mib": [min(soak.busy_rss), max(soak.busy_rss)] if soak.busy_rss else None,
    }


def start_server(args: argparse.Namespace, root: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from support.server import Server

    env = {
        "IMAGEGENX_SERVICE__MAX_QUEUED_TASKS": str(args.max_queued),
        "IMAGEGENX_SERVICE__QUEUED_TASK_TTL_S": str(args.ttl),
        "IMAGEGENX_ENGINE__MAX_BATCH": "16",
    }
    server = Server(root, model=args.model, env=env).start()
    return server, server.key("paid", rate=0.0, quota=1_000_000)  # rate 0: unlimited


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=300)
    p.add_argument("--rate", type=float, default=40.0, help="submissions per second (open loop)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--invalid", type=float, default=0.1, help="share of invalid requests")
    p.add_argument("--cancel", type=float, default=0.1, help="share of tasks cancelled after acceptance")
    p.add_argument("--burst", type=float, default=0.3, help="share of low-priority tasks (they expire first)")
    p.add_argument("--max-queued", type=int, default=60, help="the server's queue limit (then 503)")
    p.add_argument("--ttl", type=float, default=2.0, help="seconds a task may wait queued, then expired")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--model", default="random:tiny-sdxl")
    p.add_argument("--steps", type=int, default=1, help="denoising steps per task (more: a slower server)")
    p.add_argument("--seed", type=int, default=20261129)
    p.add_argument("--url", help="an already running server (then also --key; no process figures)")
    p.add_argument("--key")
    p.add_argument("--json", type=Path, help="write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        report = asyncio.run(run(args.url, args.key, args, None))
    else:
        with tempfile.TemporaryDirectory(prefix="imagegenx-soak-") as tmp:
            server, key = start_server(args, Path(tmp))
            try:
                report = asyncio.run(run(server.url, key, args, server.proc.pid))
            finally:
                server.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if report["error_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
