"""How much context a Real-ESRGAN tile needs: the tiled x4 output against the untiled one, by overlap.

    python scripts/esrgan_overlap_cpu.py [--json FILE]     # a 384² photo in 192² tiles, fp32, CPU

Each tile is read with ``overlap`` pixels of context on each side, cropped from its output
(``RealESRGAN.network_upscale``). The network's receptive field is far wider than any overlap, so a
tile's edge pixels differ from the untiled image's; the question is by how much at each overlap, since
the overlap costs work: a 512² tile read with 32 pixels each side is 13% more pixels, with 16 6%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from imagegenx.postprocess.esrgan_weights import load_rrdbnet
from imagegenx.postprocess.upscale import RealESRGAN


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    photo = Image.fromarray(data.astronaut()).resize((384, 384), Image.Resampling.LANCZOS)
    upscaler = RealESRGAN(load_rrdbnet(), "cpu")
    whole = upscaler.network_upscale([photo], tile=384, overlap=0)[0].numpy()
    report = {}
    for overlap in (0, 8, 16, 32):
        tiled = upscaler.network_upscale([photo], tile=192, overlap=overlap)[0].numpy()
        diff = np.abs(tiled.astype(int) - whole.astype(int))
        report[overlap] = {"psnr_db": round(psnr(tiled, whole), 2), "max_abs": int(diff.max())}
        figures = report[overlap]
        print(
            f"overlap {overlap:2d}: PSNR {figures['psnr_db']} dB against untiled, largest diff {diff.max()}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
