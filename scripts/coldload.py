"""Load time of a single-file checkpoint both ways: diffusers' ``from_single_file`` + ``.to(device)``
(the fallback) against ``models/fastload.py``; each load in a fresh process, cold (page cache dropped
first, as root; else ``posix_fadvise``) and warm (the file just read).

    python scripts/coldload.py FILE [--device cpu|cuda] [--dtype float16] [--runs 3] [--json OUT]

Writing a full-size random SDXL file first (about 6.9 GB in fp16):
    python scripts/coldload.py --write /tmp/sdxl-random.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _drop_cache(path: Path) -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def _one(path: Path, mode: str, device_name: str, dtype_name: str, fingerprint: bool) -> dict:
    """One load in this process; prints its seconds (and a checksum per component when asked)."""
    import torch

    from imagegenx.models import fastload
    from imagegenx.models.loader import _from_single_file
    from imagegenx.models.sources import ModelSource, arch_dir, family_of_single_file

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    family, inpaint = family_of_single_file(path)
    # What a running service has done before any load: imports and the CUDA context; not timed.
    import diffusers.loaders.single_file_utils  # noqa: F401
    import transformers  # noqa: F401

    if device.type == "cuda":
        torch.zeros(1, device=device)
    started = time.perf_counter()
    split: dict = {}
    if mode in {"fast", "fast-direct"}:
        direct = mode == "fast-direct"  # O_DIRECT reads, past the page cache (CUDA only)
        pipe, split = fastload.load_single_file(
            path, family, arch_dir(family), device, dtype, inpaint=inpaint, direct=direct
        )
    else:
        pipe = _from_single_file(ModelSource(str(path), "single-file", family, str(path), inpaint), dtype)
        pipe.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"mode": mode, "seconds": time.perf_counter() - started, "split": split}
    if fingerprint:  # float64 sums of every weight: equal loads give equal sums
        out["sums"] = {
            name: sum(float(t.double().sum()) for t in getattr(pipe, name).state_dict().values())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None
        }
    return out


def _write(path: Path, device: str) -> None:
    """A full-size random SDXL in fp16, initialised in fp16 (no float32 copy of the UNet in memory)."""
    import torch
    from safetensors.torch import save_file

    from imagegenx.models.ldm_export import to_ldm_state_dict
    from imagegenx.models.loader import _build_random

    torch.set_default_dtype(torch.float16)
    pipe = _build_random("sdxl", torch.device(device), torch.float16)
    state = {k: v.contiguous().cpu() for k, v in to_ldm_state_dict(pipe).items()}
    save_file(state, str(path), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, nargs="?")
    parser.add_argument("--write", type=Path, help="write a full-size random SDXL file here and exit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="diffusers,fast", help="of diffusers, fast, fast-direct")
    parser.add_argument("--fingerprint", action="store_true", help="also compare weight sums once per mode")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        _write(args.write, args.device)
        return
    if args.one:
        print(json.dumps(_one(args.file, args.one, args.device, args.dtype, args.fingerprint)))
        return

    results: dict[str, dict[str, list]] = {}
    for cache in ("cold", "warm"):
        for run in range(args.runs):
            for mode in args.modes.split(","):
                how = _drop_cache(args.file) if cache == "cold" else "warm"
                cmd = [sys.executable, __file__, str(args.file), "--one", mode, "--device", args.device]
                cmd += ["--dtype", args.dtype] + (["--fingerprint"] if args.fingerprint and run == 0 else [])
                line = (
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                result = json.loads(line)
                results.setdefault(f"{mode} {cache}", {}).setdefault("seconds", []).append(result["seconds"])
                results[f"{mode} {cache}"].setdefault("runs", []).append(result)
                print(
                    f"{mode:9s} {cache} ({how}) run {run}: {result['seconds']:.2f} s {result['split']}",
                    flush=True,
                )
                if "sums" in result:
                    print(f"  weight sums: {result['sums']}", flush=True)
    for key, value in results.items():
        s = value["seconds"]
        spread = f"min {min(s):.2f}, max {max(s):.2f}"
        print(f"{key:16s} median {statistics.median(s):.2f} s, {spread} ({len(s)} runs)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
