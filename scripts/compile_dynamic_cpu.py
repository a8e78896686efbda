"""Static against dynamic compile shapes (``IMAGEGENX_MODELS__COMPILE_DYNAMIC``) on the CPU: the tiny
SDXL served batches of 2, 4 and 8 UNet rows (1, 2, 3 jobs with guidance, padded), each Inductor cache
cold. Prints, per size, the compiles and seconds of its first batch and the seconds of a warm one.

    python scripts/compile_dynamic_cpu.py [--regional] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(dynamic: bool, regional: bool) -> list[dict]:
    """In this process: an engine with compile on, the three sizes cold then warm."""
    from imagegenx.bench.measure import compile_events
    from imagegenx.config import Settings
    from imagegenx.engine.engine import Engine
    from imagegenx.types import JobSpec

    jobs = [
        JobSpec(f"a red fox {i}", "random:tiny-sdxl", width=64, height=64, steps=3, seed=i) for i in range(3)
    ]
    settings = Settings()
    models = settings.models.model_copy(
        update={
            "compile": "default",
            "compile_regional": regional,
            "compile_vae": False,
            "compile_dynamic": dynamic,
        }
    )
    engine_settings = settings.engine.model_copy(update={"min_size": 64})
    rows = []
    with Engine(settings.model_copy(update={"models": models, "engine": engine_settings})) as engine:
        engine.run(jobs[:1])  # the model's load and the first graph, not counted per size below
        for n in (1, 2, 3):
            with compile_events() as events:
                started = time.perf_counter()
                engine.run(jobs[:n])
                cold = time.perf_counter() - started
            started = time.perf_counter()
            engine.run(jobs[:n])
            rows.append(
                {
                    "jobs": n,
                    "compiles": events["compiles"],
                    "first_s": cold,
                    "warm_s": time.perf_counter() - started,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regional", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one == "dynamic", args.regional)))
        return
    report = {}
    for mode in ("static", "dynamic"):
        with tempfile.TemporaryDirectory() as cache:  # cold caches, in a process of its own
            env = os.environ | {
                "TORCHINDUCTOR_CACHE_DIR": cache,
                "IMAGEGENX_DATA_DIR": cache,
                "HF_HUB_OFFLINE": "1",
            }
            command = [sys.executable, __file__, "--one", mode] + (["--regional"] if args.regional else [])
            started = time.perf_counter()
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            rows = json.loads(out.strip().splitlines()[-1])
            report[mode] = {"rows": rows, "process_s": time.perf_counter() - started}
        for row in rows:
            print(
                f"{mode:8s} {row['jobs']} job(s): {row['compiles']} compile(s), "
                f"first batch {row['first_s']:.1f} s, warm {row['warm_s']:.2f} s"
            )
        print(f"{mode:8s} whole process {report[mode]['process_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
