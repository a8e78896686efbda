"""Jobs per second through submit → lease → ack: NATS JetStream against the embedded queue on PostgreSQL.

Run:  python scripts/queue_throughput.py [--jobs 2000] [--batch 8] [--workers 1]
      [--nats nats://127.0.0.1:4222] [--postgres "host=127.0.0.1 port=5432 user=postgres dbname=postgres"]

Each backend gets a fresh stream / database (dropped afterwards). ``--jobs`` jobs over the four lanes and
four batch keys are submitted, then ``--workers`` threads (one client each) lease up to ``--batch`` jobs
at a time and ack each. Printed: submit/s, lease+ack/s, and jobs/s end to end (all jobs / total time).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from collections.abc import Callable

import psycopg

from imagegenx.queue.base import JobQueue
from imagegenx.queue.embedded import EmbeddedQueue, create_table
from imagegenx.queue.jetstream import JetStreamQueue
from imagegenx.storage.database import make_engine


def measure(name: str, client: Callable[[], JobQueue], jobs: int, batch: int, workers: int) -> None:
    submitter = client()
    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(jobs):
        submitter.submit(f"job-{i:06}", rng.randrange(4), f"key{rng.randrange(4)}")
    submitted = time.perf_counter()
    done = [0] * workers

    def work(n: int, q: JobQueue) -> None:
        while leases := q.lease(f"w{n}", batch, 30.0):
            for lease in leases:
                assert q.ack(f"w{n}", lease.task_id)
            done[n] += len(leases)

    clients = [client() for _ in range(workers)]
    threads = [threading.Thread(target=work, args=(n, q)) for n, q in enumerate(clients)]
    drain = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.perf_counter()
    assert sum(done) == jobs, (sum(done), jobs)
    print(
        f"{name:>22}: submit {jobs / (submitted - start):7.0f}/s   lease+ack {jobs / (end - drain):7.0f}/s"
        f"   end to end {jobs / (end - start):7.0f} jobs/s  ({workers} worker(s), batches of {batch})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--postgres", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    args = parser.parse_args()

    stream = f"bench-{uuid.uuid4().hex[:8]}"
    made: list[JetStreamQueue] = []

    def jetstream() -> JobQueue:
        made.append(JetStreamQueue(args.nats, stream))
        return made[-1]

    try:
        measure("NATS JetStream", jetstream, args.jobs, args.batch, args.workers)
    finally:
        made[0].drop()
        for q in made:
            q.close()

    name = f"imagegenx_queue_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://{admin.info.user}@{admin.info.host}:{admin.info.port}/{name}"
    engine = make_engine(url)
    try:
        create_table(engine)
        measure("embedded (PostgreSQL)", lambda: EmbeddedQueue(engine), args.jobs, args.batch, args.workers)
    finally:
        engine.dispose()
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
