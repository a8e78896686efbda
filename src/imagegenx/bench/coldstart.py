"""The ``cold-start`` scenario: a single-file SDXL checkpoint on local disk to the first image, LoRA
switches, and no reloads over many mixed requests.

1. A random SDXL is written as one original-layout ``.safetensors`` file (what users download from
   model sites) with three kohya LoRAs beside it; then the file is dropped from the page cache, so
   the load reads the disk (``posix_fadvise``; where the OS ignores it, the row says "cached").
2. A fresh engine takes the file to its first encoded image, without compile.
3. LoRA switches: jobs alternate between the LoRAs; a switch costs the difference between a job
   after a switch and the same job with the LoRA already active.
4. Mixed requests over two base models and the LoRAs: the model cache's counters must show no
   base model loaded twice and no LoRA file read twice.

Smoke mode does the same with the tiny SDXL on the CPU.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from imagegenx.bench.measure import Row, free_device, peak_gib, reset_peak, timed
from imagegenx.config import Settings
from imagegenx.engine.engine import Engine
from imagegenx.models.cache import ModelCache
from imagegenx.models.ldm_export import save_ldm_checkpoint
from imagegenx.models.lora_files import write_unet_loras
from imagegenx.postprocess.encode import ImageFormat, encode_image
from imagegenx.types import JobSpec, LoraRef, SchedulerName

CHECKPOINT = "sdxl-random.safetensors"
LORAS = ("style-a", "style-b", "style-c")


def _write_files(ctx, folder: Path) -> tuple[Path, float]:
    """The checkpoint (fp16 on a GPU) and three UNet LoRAs; returns the file and its size in GB."""
    models = ModelCache(ctx.settings.models.model_copy(update={"compile": "off"}))
    pipe = models.get("random:tiny-sdxl" if ctx.smoke else "random:sdxl").pipe
    path = save_ldm_checkpoint(pipe, folder / "models" / CHECKPOINT)
    rank = 4 if ctx.smoke else 32  # a typical style LoRA: ~90 MB for the SDXL UNet
    write_unet_loras(folder / "loras", pipe.components, LORAS, rank)
    return path, path.stat().st_size / 1e9


def _drop_from_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (written and synced, so they are clean)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def cold_start(name: str, ctx) -> list[Row]:
    device = ctx.device
    size = 64 if ctx.smoke else 1024
    with tempfile.TemporaryDirectory(prefix="imagegenx-coldstart-") as tmp:
        folder = Path(tmp)
        (folder / "models").mkdir()
        path, gigabytes = _write_files(ctx, folder)
        free_device()
        disk = "from disk" if _drop_from_page_cache(path) else "cached"
        models = ctx.settings.models.model_copy(
            update={"model_dir": folder / "models", "lora_dir": folder / "loras", "compile": "off"}
        )
        # Tiny checkpoints in smoke mode are below the size floor meant for real models.
        engine = ctx.settings.engine.model_copy(update={"min_size": 64} if ctx.smoke else {})
        settings = ctx.settings.model_copy(update={"models": models, "engine": engine})

        # The tiny checkpoint names its shipped architecture; a full SDXL file is recognised as it is.
        ref = f"{CHECKPOINT}#arch=tiny-sdxl" if ctx.smoke else CHECKPOINT

        def job(seed: int, side: int = size, steps: int = 4, loras=(), model: str = ref) -> JobSpec:
            return JobSpec(
                "a red fox in fresh snow",
                model,
                width=side,
                height=side,
                steps=steps,
                guidance_scale=1.0,
                scheduler=SchedulerName.LCM,
                seed=seed,
                loras=tuple(loras),
            )

        with Engine(settings) as engine:
            # 2. The file to the first encoded image.
            reset_peak(device)
            parts: dict[str, float] = {}

            def first_image() -> bytes:
                image = _image(engine.run([job(0)])[0])
                encoding = time.perf_counter()
                data = encode_image(image, ImageFormat.WEBP)
                parts.update(vars(image.timings), webp_s=time.perf_counter() - encoding)
                return data

            seconds, _ = timed(device, first_image)
            load_s = engine.models.load_seconds[ref]
            split = _split_note(engine.models.get(ref).load_split)
            first = Row(
                name,
                "imagegenx file → first image",
                1,
                seconds,
                [seconds],
                peak_gib(device),
                None,
                f"{gigabytes:.1f} GB single file {disk}, loaded in {load_s:.2f} s ({split}); "
                f"then one {size}² 4-step LCM image ({_parts_note(parts)}); no compile",
            )
            rows = [first, _lora_switches(name, engine, job, ctx), _mixed(name, engine, job, ctx, settings)]
        # The same switches with the LoRAs merged into the weights (what a compiled model uses).
        fused = settings.models.model_copy(update={"lora_mode": "fused"})
        free_device()
        reset_peak(device)  # the row's peak: one model, its LoRAs and the saved originals
        with Engine(settings.model_copy(update={"models": fused})) as engine:
            rows.insert(2, _lora_switches(name, engine, job, ctx, "fused"))
    return rows


def _split_note(split: dict) -> str:
    """Where the load's time went: which loader, and for the fast one its reads, build and warm-up."""
    if split.get("loader") != "fast":
        return f"{split.get('loader', '?')} loader"
    read = split["read_text_vae"] + split["read_unet"]
    speed = split["gigabytes"] / max(read, 1e-9)
    return (
        f"fast loader: read {read:.2f} s ({speed:.1f} GB/s; UNet {split['read_unet']:.2f} s), "
        f"text encoders + VAE + empty UNet built {split['build_text_vae']:.2f} s and warm-up "
        f"{split['warm']:.2f} s during the UNet's read, UNet weights + pipeline {split['build_unet']:.2f} s, "
        f".to(device) {split['to_device']:.2f} s, "
        f"speed-ups {split['speedups']:.2f} s"
    )


def _parts_note(parts: dict[str, float]) -> str:
    """Where the first image's own time went (its timings; ``queued_s`` holds the model's load)."""
    names = ("queued_s", "encode_prompt_s", "denoise_s", "decode_s", "webp_s")
    return ", ".join(f"{name.removesuffix('_s')} {parts[name]:.2f} s" for name in names if name in parts)


def _image(result):
    if isinstance(result, Exception):
        raise RuntimeError(f"cold-start: the first image failed: {result}")
    return result


def _lora_switches(name: str, engine: Engine, job, ctx, mode: str = "adapters") -> Row:
    side = 64 if ctx.smoke else 512

    def run(seed: int, lora: str | None) -> float:
        loras = (LoraRef(lora, 0.8),) if lora else ()
        return timed(ctx.device, lambda: engine.run([job(seed, side, 4, loras)]))[0]

    run(0, None)  # the first job after the model's load warms its kernels
    no_lora = [run(seed, None) for seed in range(1, 4)]
    first_use = [run(0, lora) for lora in LORAS]  # reads each file once
    same = [run(seed, LORAS[0]) for seed in range(1, 6)]  # warm, no switch
    switched = [run(seed, LORAS[seed % 3]) for seed in range(1, 10)]  # a different LoRA every job
    base = statistics.median(same)
    costs = [max(0.0, s - base) for s in switched]
    # The switch alone (set_adapters, or the merge), to tell it from what else a switched job does
    # again (the prompt cache is cleared on a switch, so the text encoders run).
    lora_set = engine.models.get(job(0).model).extras["loras"]
    alone = [
        timed(ctx.device, lambda i=i: lora_set.activate((LoraRef(LORAS[i % 3], 0.8),)))[0]
        for i in range(1, 10)
    ]
    return Row(
        name,
        f"imagegenx LoRA switch ({mode})",
        len(costs),
        statistics.median(costs) * len(costs),  # s/image in the table = the median switch
        costs,
        peak_gib(ctx.device),
        None,
        f"median switch {statistics.median(costs) * 1000:.0f} ms over a {base * 1000:.0f} ms {side}² "
        f"4-step job with a LoRA ({statistics.median(no_lora) * 1000:.0f} ms without), of which the "
        f"switch itself {statistics.median(alone) * 1000:.0f} ms; "
        f"first use (file read) {statistics.median(first_use) - base:.2f} s; "
        f"file reads {sum(engine.models.lora_loads().values())} for {len(LORAS)} LoRAs"
        + (f"; originals kept {lora_set.original_bytes() / 2**30:.2f} GiB" if mode == "fused" else ""),
    )


def _mixed(name: str, engine: Engine, job, ctx, settings: Settings) -> Row:
    """Requests over two base models, with and without LoRAs, all at once: no reloads allowed."""
    count, side = (40, 64) if ctx.smoke else (1000, 512)
    other = "random:tiny-sd15" if ctx.smoke else "random:sd15"
    engine.run([job(0, side, 1, model=other)])  # the second model's one load, before counting
    loads_before = sum(engine.models.loads.values())
    reads_before = sum(engine.models.lora_loads().values())
    jobs = []
    for i in range(count):
        if i % 4 == 0:
            jobs.append(job(i, side, 1, model=other))
        else:
            loras = () if i % 4 == 1 else (LoraRef(LORAS[i % 3], 1.0),)
            jobs.append(job(i, side, 1, loras))
    seconds, results = timed(ctx.device, lambda: engine.run(jobs))
    failed = [r for r in results if isinstance(r, Exception)]
    reloads = sum(engine.models.loads.values()) - loads_before
    reads = sum(engine.models.lora_loads().values()) - reads_before
    return Row(
        name,
        f"imagegenx {count} mixed requests",
        count,
        seconds,
        [],
        peak_gib(ctx.device),
        None,
        f"base model reloads {reloads}, LoRA file reads {reads}, failed {len(failed)}"
        + (f" (the first: {failed[0]})" if failed else "")
        + "; 2 models "
        f"(max_resident_models {settings.models.max_resident_models}), 3 LoRAs, {side}² 1 step",
    )
