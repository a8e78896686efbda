#!/usr/bin/env python
"""Images/s of a scaled-out imagegenx on one machine with 1, 2, ... workers (closed batch over HTTP).

For each worker count: a fresh PostgreSQL database, one `imagegenx api` node and that many
`imagegenx worker` processes (tests/support/cluster.py: real processes, shared blob folder), all
warmed up; then ``--tasks`` tasks are submitted at once through the API (batch-generate, 100 per
request) and the clock runs from the first submit until the API node reports every task succeeded.

    python scripts/scaleout_throughput.py --workers 1 2 --tasks 200 --steps 4 --side 64
    python scripts/scaleout_throughput.py --env IMAGEGENX_QUEUE__URL=nats://127.0.0.1:4222
    python scripts/scaleout_throughput.py --gpus --database sqlite --model random:sdxl --side 1024 \
        --env IMAGEGENX_MODELS__DEVICE=cuda     # 1 and 2 GPUs of one host
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.cluster import Cluster

KEY_LIMITS = ["--quota", "100000", "--rate", "1000", "-q"]  # the load must stay under the key limits


def run(workers: int, args: argparse.Namespace, root: Path) -> dict:
    if args.database == "sqlite":  # a GPU machine without PostgreSQL: the embedded queue on SQLite
        return run_on(f"sqlite:///{root / 'tasks.db'}", workers, args, root)
    from support.services import create_database, drop_database

    url = create_database()
    try:
        return run_on(url.render_as_string(hide_password=False), workers, args, root)
    finally:
        drop_database(url)


def run_on(database_url: str, workers: int, args: argparse.Namespace, root: Path) -> dict:
    env = dict(item.split("=", 1) for item in args.env) | {"IMAGEGENX_SERVICE__REQUIRE_KEYS": "true"}
    cluster = Cluster(root, database_url, env=env | {"IMAGEGENX_MODELS__DEFAULT_MODEL": args.model})
    try:
        key = subprocess.run(
            [sys.executable, "-m", "imagegenx.cli", "keys", "create", "bench", *KEY_LIMITS],
            env=cluster.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if args.gpus:  # one `imagegenx worker --gpus 0,1,...`: a process per GPU
            gpus = ",".join(str(i) for i in range(workers))
            nodes = [cluster.start_worker("workers", wait=False, args=("--gpus", gpus))]
        else:
            nodes = [cluster.start_worker(f"worker{i}", wait=False) for i in range(workers)]
        _, url = cluster.start_api()
        for node in nodes:
            node.wait_for_line(" ready (", timeout=args.start_timeout, count=workers if args.gpus else 1)
        return measure(url, key, workers, args)
    finally:
        cluster.close()


def measure(url: str, key: str, workers: int, args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"width": args.side, "height": args.side, "steps": args.steps, "seed": 1, "model": args.model}
    body |= {"cfg_scale": args.cfg}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        start = time.monotonic()
        for first in range(0, args.tasks, 100):
            texts = [f"{args.prompt} {i}" for i in range(first, min(args.tasks, first + 100))]
            response = http.post("/api/v1/image/batch-generate", json=body | {"texts": texts})
            response.raise_for_status()
        while True:
            counts = {
                status: http.get(f"/api/v1/image/tasks?status={status}&page_size=1").json()["data"]["total"]
                for status in ("succeeded", "failed")
            }
            if sum(counts.values()) >= args.tasks:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - start
    return {
        "workers": workers,
        "tasks": args.tasks,
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "seconds": round(elapsed, 2),
        "images_per_s": round(counts["succeeded"] / elapsed, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to run [1 2]")
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--side", type=int, default=64, help="Width and height [64]")
    p.add_argument("--model", default="random:tiny-sdxl")
    p.add_argument("--cfg", type=float, default=7.0, help="cfg_scale [7]")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="Extra env for every node"
    )
    p.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    p.add_argument("--gpus", action="store_true", help="N workers = one `worker --gpus 0,..,N-1`")
    p.add_argument("--start-timeout", type=float, default=300, help="Seconds for workers to warm up")
    p.add_argument("--json", type=Path, help="Write the results here too")
    args = p.parse_args()
    results = []
    for count in args.workers:
        with tempfile.TemporaryDirectory(prefix="igx-throughput-") as root:
            results.append(run(count, args, Path(root)))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["images_per_s"]
    for result in results:
        rate = result["images_per_s"]
        print(f"{result['workers']} worker(s): {rate} images/s ({rate / base:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
