"""GPU timings of the post-processing chain (not the `imagegenx bench` harness, a later issue).

Run on a CUDA machine:  python scripts/postprocess_gpu.py OUT_DIR
Writes OUT_DIR/postprocess_gpu.json with, per step, seconds per image (after a warm-up, CUDA
synchronised):
- Real-ESRGAN x4plus (real weights) in fp16: a 1024x1024 image to 4096x4096, alone and in a batch
  of 4, plus 512x512 inputs in a batch of 16; with network_strength 0.35 and unsharp (seed 000);
- the chain's denoising passes on `random:sdxl` (full-size SDXL, random weights) at 1024²:
  face fix (crops of 4 images inpainted as one batch, 30 steps at strength 0.4) and hires fix
  (4 first passes of 512² upscaled x2 and re-denoised, 30 steps at strength 0.35).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from imagegenx.config import ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
from imagegenx.postprocess.upscale import Upscale
from imagegenx.types import GeneratedImage, JobSpec
from imagegenx.vision import detect


def timed(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` wall seconds after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def photo(size: int, seed: int) -> GeneratedImage:
    pixels = np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS))
    job = JobSpec("a portrait photo", "random:sdxl", width=size, height=size, steps=30, seed=seed)
    return GeneratedImage(job, size, size, pixels.tobytes(), "random:sdxl", 1)


class FixedFaceDetector:
    def detect_batch(self, images):
        box = (348, 136, 556, 344)
        return [[detect.Detection("face", box, 0.9, np.zeros((6, 2)))] for _ in images]


def main(out: Path) -> None:
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "per_image_s": {}}
    per_image = report["per_image_s"]
    big = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.LANCZOS)
    small = Image.fromarray(data.astronaut())
    upscale = Upscale()
    params = {"scale": 4, "network_strength": 0.35, "unsharp": True, "batch_size": 4}
    per_image["esrgan_x4_1024_alone"] = timed(lambda: upscale.apply([big], params))
    per_image["esrgan_x4_1024_batch4"] = timed(lambda: upscale.apply([big] * 4, params)) / 4
    network_only = {"scale": 4, "network_strength": 1.0, "unsharp": False, "batch_size": 4}
    per_image["esrgan_x4_1024_network_only_batch4"] = (
        timed(lambda: upscale.apply([big] * 4, network_only)) / 4
    )
    params16 = params | {"batch_size": 16}
    per_image["esrgan_x4_512_batch16"] = timed(lambda: upscale.apply([small] * 16, params16)) / 16
    report["esrgan_peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(per_image, flush=True)

    photos = [photo(1024, seed) for seed in range(4)]

    # The device machine gets no LiteRT runtime (the transfer limit): the detection pass (CPU, timed
    # on the build machine) is replaced by the astronaut's face box as mediapipe finds it at 1024².
    detect.MediapipeDetector = FixedFaceDetector
    settings = Settings(models=ModelSettings(device="cuda", dtype="float16"))
    with Engine(settings) as engine:
        engine.models.get("random:sdxl")
        fix = PostprocessSpec(face_fix=True, fix_strength=0.4)
        per_image["face_fix_sdxl_1024_batch4"] = timed(lambda: apply_chain(photos, fix, engine), 2) / 4
        fixed = apply_chain(photos, fix, engine)
        report["face_fix_regions"] = [image.post["fixed"] for image in fixed]
        first = [photo(512, seed) for seed in range(4)]
        hires = PostprocessSpec(hires_scale=2, hires_strength=0.35)
        per_image["hires_x2_sdxl_512_to_1024_batch4"] = (
            timed(lambda: apply_chain(first, hires, engine), 2) / 4
        )
    report["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report["per_image_s"] = {k: round(v, 4) for k, v in per_image.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "postprocess_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
