"""QC seconds per 1024² draft on this CPU, serial and on a process pool, with the real helper models.

Drafts are scikit-image's astronaut resized to 1024², mirrored, shifted, noised and some blurred;
the reference is her aligned selfie crop and the embedding the mean of her and her mirror image, as
a portrait run has them. For each run it checks that the pool gives exactly the serial scores,
records and shortlist. ``--serial-only`` measures only the serial path (also works on older code).
Figures: ``serial`` and ``pool-N`` are wall seconds per draft (a pool's start included), and
``serial-cpu`` CPU seconds per draft (steadier than wall time on a shared machine);
``pool-N-start_s`` the seconds from a pool's creation to the scores of its first image;
``overlap-N-tail_s`` the seconds QC takes after the last draft when it runs during the drafting.

    python scripts/qc_speed.py --n 24 --workers 1 2 --repeat 3
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time

import numpy as np
from PIL import Image
from skimage import data

from imagegenx.postprocess.shortlist import score_drafts
from imagegenx.types import GeneratedImage, JobSpec
from imagegenx.vision.identity import DlibIdentity, mean_embedding
from imagegenx.vision.selfie import read_selfie


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def drafts(n: int, size: int = 1024) -> list[GeneratedImage]:
    """``n`` varied astronaut drafts of ``size``² (seeded: the same drafts every run)."""
    astronaut = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else astronaut
        pixels = np.roll(np.asarray(image).astype(np.int16), 16 * i, axis=1)
        pixels = np.clip(pixels + rng.integers(-8, 8, pixels.shape), 0, 255).astype(np.uint8)
        if i % 5 == 4:  # a soft one
            soft = Image.fromarray(pixels).resize((size // 4, size // 4)).resize((size, size))
            pixels = np.asarray(soft)
        job = JobSpec(prompt="qc speed", model="random:sdxl", seed=i)
        out.append(GeneratedImage(job, size, size, pixels.tobytes(), "random:sdxl", 1))
    return out


def reference() -> tuple[Image.Image, np.ndarray]:
    astronaut = data.astronaut()
    faces = DlibIdentity(upsample=1)
    selfies = [read_selfie(name, _png(p), faces) for name, p in (("a", astronaut), ("m", astronaut[:, ::-1]))]
    return selfies[0].crop, mean_embedding([s.embedding for s in selfies])


def overlapped(
    images: list[GeneratedImage], crop: Image.Image, embedding: np.ndarray, workers: int, per_draft: float
) -> float:
    """Seconds of QC left once the last group of 16 drafts is out (sleeping stands for the GPU)."""
    from imagegenx.postprocess.shortlist import draft_pool

    arrays = [np.asarray(Image.frombytes("RGB", (1024, 1024), d.rgb)) for d in images]
    with draft_pool(crop, embedding, 1024, 1024, workers) as pool:
        for start in range(0, len(arrays), 16):
            group = range(start, min(start + 16, len(arrays)))
            time.sleep(per_draft * len(group))
            for i in group:
                pool.add(i, arrays[i])
        drafted = time.perf_counter()
        score_drafts(images, crop, embedding, k=15, scores=pool.scores())
        return time.perf_counter() - drafted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serial-only", action="store_true")
    parser.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help="also simulate a portrait run: drafts made at this many seconds each, in groups of 16, "
        "QC'd on the pool meanwhile; reports the QC time left after the last group",
    )
    args = parser.parse_args()
    images, (crop, embedding) = drafts(args.n), reference()
    score_drafts(images[:1], crop, embedding)  # load the models outside the timings
    results: dict[str, list[float]] = {"serial": [], "serial-cpu": []}
    serial = None
    for _ in range(args.repeat):
        started, cpu = time.perf_counter(), time.process_time()
        serial = score_drafts(images, crop, embedding, k=15)
        results["serial"].append((time.perf_counter() - started) / args.n)
        results["serial-cpu"].append((time.process_time() - cpu) / args.n)
    if not args.serial_only:
        from imagegenx.postprocess.shortlist import draft_pool

        for workers in args.workers:
            key = f"pool-{workers}"
            results[key], results[key + "-start_s"] = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()  # a pool's start: spawn, imports, models, one image
                with draft_pool(crop, embedding, 1024, 1024, workers) as pool:
                    pool.add(0, np.asarray(Image.frombytes("RGB", (1024, 1024), images[0].rgb)))
                    pool.scores()
                results[key + "-start_s"].append(time.perf_counter() - started)
                order = list(range(args.n))
                random.Random(workers).shuffle(order)  # drafts arrive in any order
                started = time.perf_counter()
                with draft_pool(crop, embedding, 1024, 1024, workers) as pool:
                    for i in order:
                        pool.add(i, np.asarray(Image.frombytes("RGB", (1024, 1024), images[i].rgb)))
                    pooled = score_drafts(images, crop, embedding, k=15, scores=pool.scores())
                results[key].append((time.perf_counter() - started) / args.n)
                assert serial is not None
                same = [d.post["qc"] for d in pooled[0]] == [d.post["qc"] for d in serial[0]]
                if not same or pooled[1:] != serial[1:]:
                    raise SystemExit(f"{key}: scores or shortlist differ from the serial path")
    if args.overlap:  # with the most workers asked for
        workers = max(args.workers)
        results[f"overlap-{workers}-tail_s"] = [
            overlapped(images, crop, embedding, workers, args.overlap) for _ in range(args.repeat)
        ]
    summary = {
        key: {"values": [round(v, 3) for v in values], "median": round(statistics.median(values), 3)}
        for key, values in results.items()
    }
    print(json.dumps({"n": args.n, "size": 1024, "runs": summary}, indent=1))


if __name__ == "__main__":
    main()
