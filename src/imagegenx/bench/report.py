"""Run scenarios and report them: a table for people, JSON for BENCHMARKS.md and for diffs."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import PIL
import torch
from rich.console import Console
from rich.table import Table

from imagegenx.bench.measure import Row, matmul_peak_tflops
from imagegenx.bench.scenarios import SCENARIOS, BenchContext


def machine(ctx: BenchContext) -> dict[str, Any]:
    import diffusers

    device = ctx.device
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        # the host side of the stages that run on the CPU (a portrait's encodes, QC's processes)
        "cpus": os.cpu_count(),
        "pillow": PIL.__version__,
        "smoke": ctx.smoke,
        "speedups": ctx.settings.models.model_dump(
            include={
                "dtype",
                "channels_last",
                "vae_channels_last",
                "fuse_qkv",
                "compile",
                "compile_vae",
                "compile_regional",
                "compile_dynamic",
                "fp8",
                "fp8_granularity",
                "attention",
                "inductor_flags",
            }
        ),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["driver"] = _driver()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    info["matmul_peak_tflops"] = matmul_peak_tflops(device, dtype)
    return info


def _driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def run(names: list[str], ctx: BenchContext, console: Console, out: Path | None = None) -> dict[str, Any]:
    """Every named scenario, one after the other; a scenario that cannot run says why. The JSON report
    is rewritten to ``out`` after each scenario, so a run cut short keeps what it measured."""
    report = machine(ctx)
    peak = report["matmul_peak_tflops"]
    report["scenarios"] = {}
    started = time.monotonic()
    for name in names:
        scenario = SCENARIOS[name]
        if scenario.run is None:
            report["scenarios"][name] = {"what": scenario.what, "skipped": scenario.missing}
        else:
            console.print(f"[bold]{name}[/bold]: {scenario.what}")
            done: list[Row] = []

            def keep(row: Row, name: str = name, done: list[Row] = done, what: str = scenario.what) -> None:
                done.append(row)
                elapsed = time.monotonic() - started
                console.print(
                    f"  {row.runner}: {row.seconds / row.images:.4g} s/image ({elapsed:.0f} s into the run)"
                )
                report["scenarios"][name] = _result(what, done, peak, partial=True)
                _write(report, out)

            rows = scenario.run(replace(ctx, on_row=keep))
            report["scenarios"][name] = _result(scenario.what, rows, peak)
        _write(report, out)
    return report


def _result(what: str, rows: list[Row], peak: float | None, partial: bool = False) -> dict[str, Any]:
    result = {"what": what, "rows": [row.as_dict(peak) for row in rows], "speedup_vs": speedups(rows)}
    if partial:
        result["partial"] = True  # the scenario had not finished when this was written
    return result


def _write(report: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.write_text(json.dumps(report, indent=2))


def speedups(rows: list[Row]) -> dict[str, float]:
    """Our images/s divided by each peer's: the headline (above 1: we are faster)."""
    ours = rows[0]
    return {
        row.runner: round(ours.images_per_s / row.images_per_s, 2)
        for row in rows[1:]
        if row.runner.startswith("diffusers") and row.images_per_s > 0
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    where = report.get("gpu") or report["device"]
    title = f"imagegenx bench on {where}, torch {report['torch']}, {report['date']}"
    table = Table(
        "scenario",
        "runner",
        "images",
        "s/image",
        "images/s",
        "p50 s",
        "p99 s",
        "VRAM GiB",
        "TFLOP/s",
        "vs ours",
        title=title,
    )
    for name, result in report["scenarios"].items():
        if "skipped" in result:
            table.add_row(name, f"skipped: {result['skipped']}", *[""] * 8)
            continue
        ratios = result["speedup_vs"]
        for row in result["rows"]:
            ratio = ratios.get(row["runner"])
            table.add_row(
                name,
                row["runner"],
                str(row["images"]),
                _num(row["seconds_per_image"]),
                _num(row["images_per_s"]),
                _num(row["p50_s"]),
                _num(row["p99_s"]),
                _num(row["peak_vram_gib"]),
                _num(row["achieved_tflops"]),
                f"ours {ratio:g}x" if ratio else "",
            )
    console.print(table)
    console.print(f"matmul peak: {report['matmul_peak_tflops']} TFLOP/s")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"
