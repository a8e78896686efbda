"""What a post-processing pass pays on the host to hand an image to the engine, and to encode a final.

    python scripts/pass_images_cpu.py [--json FILE]

A refine, hires or face-fix pass turns each image into a job whose input image is bytes: PNG
(compress level 1, the old way) against raw PPM (``encode_in_process``, now), each encoded and read
back as the engine reads it, for a 1024² image of noise (what random-weight drafts are) and a
smooth one (closer to a photo). Then the WebP encode of a 4096² final (the portrait's write stage)
for an upscaled noise image and an upscaled photo. Best of 5 each, one thread.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from imagegenx.pipelines.sample import decode_input_image
from imagegenx.postprocess.encode import ImageFormat, encode_pil
from imagegenx.vision.imagefile import encode_in_process


def best_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(min(times) * 1000, 2)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    smooth = noise.resize((64, 64), Image.Resampling.BOX).resize((1024, 1024), Image.Resampling.BICUBIC)
    photo = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.LANCZOS)
    report: dict[str, dict] = {"pass_input_1024": {}, "final_webp_4096": {}}
    for name, image in (("noise", noise), ("smooth", smooth)):
        png, ppm = png_bytes(image), encode_in_process(image)
        report["pass_input_1024"][name] = {
            "png_encode_ms": best_ms(lambda image=image: png_bytes(image)),
            "png_read_ms": best_ms(lambda png=png: decode_input_image(png, "input")),
            "png_mb": round(len(png) / 1e6, 2),
            "ppm_encode_ms": best_ms(lambda image=image: encode_in_process(image)),
            "ppm_read_ms": best_ms(lambda ppm=ppm: decode_input_image(ppm, "input")),
            "ppm_mb": round(len(ppm) / 1e6, 2),
        }
    for name, image in (("noise", noise), ("photo", photo)):
        big = image.resize((4096, 4096), Image.Resampling.LANCZOS)
        encoded = encode_pil(big, ImageFormat.WEBP)
        report["final_webp_4096"][name] = {
            "encode_ms": best_ms(lambda big=big: encode_pil(big, ImageFormat.WEBP), repeats=2),
            "mb": round(len(encoded) / 1e6, 2),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
