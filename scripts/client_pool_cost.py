#!/usr/bin/env python
"""What an HTTP client's connection pool costs the load generator, by client library.

A tiny ASGI app (in a uvicorn subprocess) answers each POST after ``hold`` seconds, so ``rate x hold``
requests are in flight at once, as when a load generator runs ahead of a slow server. The client
sends on a fixed schedule from one asyncio loop, as ``scripts/loadgen.py`` does, and reports its own
CPU per request and how late its sends were. httpx's pool does work per request in proportion to
connections x queued requests; httpx2's does not (why loadgen.py uses httpx2).

    python scripts/client_pool_cost.py                      # httpx and httpx2, 150/s, hold 0 / 2 / 5 s
    python scripts/client_pool_cost.py --rate 300 --hold 1 --libs httpx2
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = """
import asyncio
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(float(scope["query_string"].decode().partition("=")[2] or 0))
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})
"""


QUIET = ("--log-level", "warning", "--no-access-log", "--backlog", "4096")


async def measure(lib: str, url: str, rate: float, hold: float, seconds: float) -> dict:
    http = importlib.import_module(lib)
    limits = http.Limits(max_connections=512, max_keepalive_connections=512)  # loadgen's default cap
    async with http.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def post(i: int) -> str | None:
            try:
                await client.post(f"/x?hold={hold}", json={"i": i})
            except http.HTTPError as exc:
                return type(exc).__name__
            return None

        n, lags, tasks = int(rate * seconds), [], []
        start, cpu = time.perf_counter(), os.times()
        for i in range(n):
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            lags.append(time.perf_counter() - due)
            tasks.append(asyncio.create_task(post(i)))
        errors = [e for e in await asyncio.gather(*tasks) if e]
        used = sum(os.times()[:2]) - sum(cpu[:2])
    lags.sort()
    return {
        "lib": lib,
        "rate": rate,
        "hold_s": hold,
        "in_flight": round(rate * hold),
        "requests": n,
        "client_cpu_ms_per_request": round(used / n * 1000, 2),
        "send_lag_p99_ms": round(lags[int(0.99 * (n - 1))] * 1000, 1),
        "errors": len(errors),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libs", nargs="+", default=["httpx", "httpx2"])
    p.add_argument("--rate", type=float, default=150.0)
    p.add_argument("--hold", type=float, nargs="+", default=[0.0, 2.0, 5.0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "holdapp.py").write_text(APP)
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "holdapp:app", "--port", str(args.port), *QUIET],
            cwd=folder,
        )
        try:
            time.sleep(2)
            for hold in args.hold:
                for lib in args.libs:
                    url = f"http://127.0.0.1:{args.port}"
                    print(asyncio.run(measure(lib, url, args.rate, hold, args.seconds)), flush=True)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
