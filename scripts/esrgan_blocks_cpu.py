"""Real-ESRGAN x4plus on the CPU with its dense blocks plain and fused (postprocess/rrdbnet.py).

    python scripts/esrgan_blocks_cpu.py            # a 128² tile, fp32, best of 3 each

The fused blocks do the same products in fewer, wider convolutions; on a GPU the bench's
esrgan-x4-1024 scenario measures both (its "dense blocks" row).
"""

import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from imagegenx.postprocess.esrgan_weights import load_rrdbnet

photo = Image.fromarray(data.astronaut()).resize((128, 128), Image.Resampling.LANCZOS)
x = torch.from_numpy(np.asarray(photo, np.float32) / 255).permute(2, 0, 1)[None]
outputs = {}
with torch.inference_mode():
    for name, net in (("plain", load_rrdbnet()), ("fused", load_rrdbnet().fuse_dense_blocks())):
        net(x)  # warm-up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            outputs[name] = net(x)
            best = min(best, time.perf_counter() - started)
        print(f"{name}: {best:.3f} s for a 128² tile ({torch.get_num_threads()} threads)")
print(f"largest difference: {(outputs['plain'] - outputs['fused']).abs().max().item():.2e} (0-1 scale)")
