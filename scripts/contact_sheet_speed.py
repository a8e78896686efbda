"""Seconds to draw a portrait's contact sheet: 100 noise drafts of 1024² (random weights make noise).

python scripts/contact_sheet_speed.py
"""

import time

import numpy as np
from PIL import Image

from imagegenx.postprocess.contact_sheet import contact_sheet

rng = np.random.default_rng(0)
drafts = [Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)) for _ in range(100)]
best = float("inf")
for _ in range(3):
    started = time.perf_counter()
    contact_sheet(drafts, [f"#{i}" for i in range(100)], outlined=range(15))
    best = min(best, time.perf_counter() - started)
print(f"contact sheet of 100 1024² drafts: {best:.3f} s (best of 3)")
