"""GPU check of the engine core at full size (random weights): our loop vs diffusers, and batching.

Run on a CUDA machine:  python scripts/gpu_check.py OUT_DIR
Writes OUT_DIR/gpu_check.json. Not a benchmark harness (that is `imagegenx bench`, a later issue):
it proves the engine's own SDXL loop matches diffusers' pipeline in fp16 on the GPU and records how
long one image and a batch of eight take through the engine.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imagegenx.config import EngineSettings, ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.pipelines.samplers import make_scheduler
from imagegenx.types import JobSpec, SchedulerName


def main(out: Path) -> None:
    settings = Settings(models=ModelSettings(device="cuda", dtype="float16"), engine=EngineSettings())
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    job = JobSpec("a red fox in snow, photo", "random:sdxl", width=1024, height=1024, steps=30, seed=7)
    with Engine(settings) as engine:
        started = time.perf_counter()
        engine.models.get("random:sdxl")
        report["build_random_sdxl_s"] = round(time.perf_counter() - started, 2)
        engine.submit(job).result()  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        ours = engine.submit(job).result()
        report["one_image_30_steps_s"] = round(time.perf_counter() - started, 3)

        # The same image from diffusers' own pipeline __call__, same components and seed.
        pipe = engine.models.get("random:sdxl").pipe
        pipe.scheduler = make_scheduler(SchedulerName.DPMPP_2M_KARRAS, pipe.scheduler.config)
        pipe.vae.to(torch.float16)  # the engine keeps it in fp32; diffusers upcasts it by itself
        torch.cuda.synchronize()
        started = time.perf_counter()
        theirs = pipe(
            prompt=job.prompt,
            negative_prompt=job.effective_negative_prompt,
            num_inference_steps=30,
            guidance_scale=job.guidance_scale,
            height=1024,
            width=1024,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
        ).images[0]
        report["diffusers_one_image_s"] = round(time.perf_counter() - started, 3)
        pipe.vae.to(torch.float32)
        ours_px = np.frombuffer(ours.rgb, np.uint8).reshape(1024, 1024, 3).astype(int)
        theirs_px = (theirs * 255).round().astype(int)
        report["ours_vs_diffusers_mean_abs_px"] = float(np.abs(ours_px - theirs_px).mean())
        report["ours_vs_diffusers_max_abs_px"] = int(np.abs(ours_px - theirs_px).max())

        # Eight jobs with different prompts and seeds arrive together: one batch.
        jobs = [
            JobSpec(f"prompt number {i}", "random:sdxl", width=1024, height=1024, steps=30, seed=i)
            for i in range(8)
        ]
        torch.cuda.synchronize()
        started = time.perf_counter()
        results = [f.result() for f in [engine.submit(j) for j in jobs]]
        elapsed = time.perf_counter() - started
        report["batch8_s"] = round(elapsed, 3)
        report["batch8_images_per_s"] = round(8 / elapsed, 3)
        report["batch8_batch_sizes"] = sorted({r.batch_size for r in results})
        report["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["model_loads"] = dict(engine.models.loads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
